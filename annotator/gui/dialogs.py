"""Dialogs: new project (from an MVTec-AD tree or from folders, marking the defect-free
images) and export. Each returns a plain request; the window runs it as a job."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QButtonGroup, QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout,
                               QHBoxLayout, QLabel, QLineEdit, QMessageBox, QPushButton, QRadioButton, QVBoxLayout,
                               QWidget)

from annotator.core.store import DB_NAME

EXPORT_FORMATS = (
    ("mvtec", "MVTec-AD tree (ground_truth masks)"),
    ("coco", "COCO JSON (polygons per region, with classes)"),
    ("labelme", "labelme JSON beside each image name"),
    ("masks", "Plain mask PNGs (0/255)"),
)


@dataclass(frozen=True)
class NewProjectRequest:
    project_dir: str
    kind: str  # "mvtec" | "folders"
    mvtec_root: str = ""
    label_dir: str = ""
    good_dir: str = ""

    def sources(self) -> list[tuple[str, str]]:
        if self.kind == "mvtec":
            return [("mvtec", self.mvtec_root)]
        return [(k, d) for k, d in (("good", self.good_dir), ("label", self.label_dir)) if d]


def validate_new_project(req: NewProjectRequest) -> Optional[str]:
    """None when the request can be carried out, else what to fix (one sentence)."""
    if not req.project_dir.strip():
        return "Choose a folder for the new project."
    target = Path(req.project_dir)
    if (target / DB_NAME).exists():
        return f"{target} already holds a project; open it instead."
    if target.exists() and not target.is_dir():
        return f"{target} is a file, not a folder."
    if req.kind == "mvtec":
        root = Path(req.mvtec_root)
        if not req.mvtec_root or not (root / "train").is_dir() or not (root / "test").is_dir():
            return "The MVTec-AD folder must contain train/ and test/."
        return None
    if not req.label_dir and not req.good_dir:
        return "Choose the folder of images to label and the folder of defect-free images."
    for d in (req.label_dir, req.good_dir):
        if d and not Path(d).is_dir():
            return f"There is no folder at {d}."
    if not req.good_dir:
        return "Model 1 trains on defect-free images: choose a folder of them too (at least 4 images)."
    return None


def open_message(parent: QWidget, title: str, text: str) -> QMessageBox:
    """A warning box that does not block the event loop (jobs and timers go on)."""
    box = QMessageBox(QMessageBox.Icon.Warning, title, text, QMessageBox.StandardButton.Ok, parent)
    box.setWindowModality(Qt.WindowModality.WindowModal)
    box.open()
    return box


def _path_row(parent: QWidget, placeholder: str, caption: str) -> tuple[QWidget, QLineEdit]:
    row = QWidget(parent)
    edit = QLineEdit(row)
    edit.setPlaceholderText(placeholder)
    browse = QPushButton("Browse…", row)
    browse.clicked.connect(lambda: edit.setText(QFileDialog.getExistingDirectory(parent, caption, edit.text()) or edit.text()))
    lay = QHBoxLayout(row)
    lay.setContentsMargins(0, 0, 0, 0)
    lay.addWidget(edit, 1)
    lay.addWidget(browse)
    return row, edit


class NewProjectDialog(QDialog):
    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("New project")
        self.setMinimumWidth(560)
        form = QFormLayout()
        row, self.project_dir = _path_row(self, "where the project folder goes", "Project folder")
        form.addRow("Project folder", row)
        self.mvtec = QRadioButton("An MVTec-AD tree: train/good are defect-free, test/** are to label", self)
        self.folders = QRadioButton("Folders of images", self)
        self.mvtec.setChecked(True)
        group = QButtonGroup(self)
        group.addButton(self.mvtec)
        group.addButton(self.folders)
        form.addRow(self.mvtec)
        row, self.mvtec_root = _path_row(self, "folder with train/ and test/", "MVTec-AD folder")
        form.addRow("MVTec-AD folder", row)
        form.addRow(self.folders)
        row, self.label_dir = _path_row(self, "images to label", "Images to label")
        form.addRow("Images to label", row)
        row, self.good_dir = _path_row(self, "defect-free images (model 1 trains on these)", "Defect-free images")
        form.addRow("Defect-free images", row)
        self.error = QLabel("", self)
        self.error.setObjectName("error")
        self.error.setWordWrap(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Create")
        buttons.accepted.connect(self._try_accept)
        buttons.rejected.connect(self.reject)
        self.mvtec.toggled.connect(self._kind_changed)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.error)
        lay.addWidget(buttons)
        self._kind_changed()

    def request(self) -> NewProjectRequest:
        return NewProjectRequest(self.project_dir.text().strip(), "mvtec" if self.mvtec.isChecked() else "folders",
                                 self.mvtec_root.text().strip(), self.label_dir.text().strip(),
                                 self.good_dir.text().strip())

    def _kind_changed(self) -> None:
        m = self.mvtec.isChecked()
        self.mvtec_root.parentWidget().setEnabled(m)
        self.label_dir.parentWidget().setEnabled(not m)
        self.good_dir.parentWidget().setEnabled(not m)

    def _try_accept(self) -> None:
        problem = validate_new_project(self.request())
        if problem:
            self.error.setText(problem)
        else:
            self.accept()


#: the kinds of batch "Add images…" takes: key, radio text, folder hint
ADD_KINDS = (
    ("label", "Images to label", "folder of images (searched recursively)"),
    ("good", "Defect-free images: model 1 trains on these", "folder of defect-free images"),
    ("mvtec", "An MVTec-AD tree: train/good are defect-free, test/** are to label", "folder with train/ and test/"),
)


def validate_add_images(kind: str, folder: str) -> Optional[str]:
    """None when the batch can be added, else what to fix (one sentence)."""
    if not folder:
        return "Choose the folder to add."
    root = Path(folder)
    if not root.is_dir():
        return f"There is no folder at {folder}."
    if kind == "mvtec" and not ((root / "train").is_dir() and (root / "test").is_dir()):
        return "The MVTec-AD folder must contain train/ and test/."
    return None


class AddImagesDialog(QDialog):
    """A new batch for an open project. Paths that other images already hold put the batch under its
    folder's name (``day2/001.png``), so nothing is refused for a repeated file name."""

    def __init__(self, start_dir: str = "", parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Add images")
        self.setMinimumWidth(560)
        lay = QVBoxLayout(self)
        self.kinds = QButtonGroup(self)
        for k, (key, text, _) in enumerate(ADD_KINDS):
            radio = QRadioButton(text, self)
            radio.setChecked(k == 0)
            self.kinds.addButton(radio, k)
            lay.addWidget(radio)
        row, self.folder = _path_row(self, ADD_KINDS[0][2], "Folder to add")
        self.folder.setText(start_dir)
        form = QFormLayout()
        form.addRow("Folder", row)
        lay.addLayout(form)
        note = QLabel("Images are referenced where they lie, not copied. When a file's path is already taken by "
                      "another image (001.png every day), the batch goes under its folder's name.", self)
        note.setObjectName("muted")
        note.setWordWrap(True)
        lay.addWidget(note)
        self.error = QLabel("", self)
        self.error.setObjectName("error")
        self.error.setWordWrap(True)
        lay.addWidget(self.error)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Add")
        buttons.accepted.connect(self._try_accept)
        buttons.rejected.connect(self.reject)
        lay.addWidget(buttons)
        self.kinds.idToggled.connect(lambda k, on: on and self.folder.setPlaceholderText(ADD_KINDS[k][2]))

    def choice(self) -> tuple[str, str]:
        return ADD_KINDS[self.kinds.checkedId()][0], self.folder.text().strip()

    def _try_accept(self) -> None:
        problem = validate_add_images(*self.choice())
        if problem:
            self.error.setText(problem)
        else:
            self.accept()


class ExportDialog(QDialog):
    def __init__(self, loop_finished: bool, remaining: int, default_dir: str = "",
                 parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Export labels")
        self.setMinimumWidth(520)
        self.format = QComboBox(self)
        for key, text in EXPORT_FORMATS:
            self.format.addItem(text, key)
        row, self.out_dir = _path_row(self, "output folder", "Export to")
        self.out_dir.setText(default_dir)
        note = QLabel(self)
        note.setWordWrap(True)
        if loop_finished:
            note.setText("The loop is finished: every label was accepted by the last check round.")
        else:
            note.setObjectName("warning")
            note.setText(f"The loop is not finished: {remaining} image(s) still need a pre-check, a check or a "
                         "review. Exporting now writes the current labels as they are.")
        form = QFormLayout()
        form.addRow("Format", self.format)
        form.addRow("Folder", row)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel, self)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Export")
        buttons.accepted.connect(self._try_accept)
        buttons.rejected.connect(self.reject)
        self.error = QLabel("", self)
        self.error.setObjectName("error")
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(note)
        lay.addWidget(self.error)
        lay.addWidget(buttons)

    def choice(self) -> tuple[str, str]:
        return self.format.currentData(), self.out_dir.text().strip()

    def _try_accept(self) -> None:
        if not self.out_dir.text().strip():
            self.error.setText("Choose an output folder.")
        else:
            self.accept()
