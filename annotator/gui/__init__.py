"""The desktop app (PySide6): thin Qt views over the headless core. The only package that
imports Qt and the only place threads start (:mod:`annotator.gui.jobs`)."""
