"""Machine-learning layer (torch, timm, anomalib). Imported lazily: never on the GUI's
start-up path nor by light CLI verbs."""
