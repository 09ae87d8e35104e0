"""What the app remembers per user (QSettings): recent projects, and per project the
image the person was on and the zoom, so reopening puts them back where they were."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QMenu

MAX_RECENT = 8


def _as_list(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


class Remembered:
    def __init__(self, settings: QSettings) -> None:
        self.settings = settings

    # ---- recent projects

    def recent(self) -> list[str]:
        return _as_list(self.settings.value("recent", []))

    def add_recent(self, path: str) -> None:
        self.settings.setValue("recent", ([path] + [p for p in self.recent() if p != path])[:MAX_RECENT])
        self.settings.setValue("last_project", path)

    def last_project(self) -> str:
        return str(self.settings.value("last_project", "") or "")

    def last_dir(self) -> str:
        last = self.last_project()
        return str(Path(last).parent) if last else str(Path.home())

    def fill_menu(self, menu: QMenu, open_project: Callable[[str], object]) -> None:
        menu.clear()
        for path in self.recent():
            menu.addAction(path, lambda p=path: open_project(p))
        menu.setEnabled(bool(self.recent()))

    # ---- per project: where the person was

    @staticmethod
    def _key(project: Path) -> str:
        return "project/" + hashlib.sha1(str(project).encode()).hexdigest()[:12]

    def set_place(self, project: Path, image_id: Optional[int] = None, zoom: Optional[float] = None) -> None:
        if image_id is not None:
            self.settings.setValue(f"{self._key(project)}/image", int(image_id))
        if zoom is not None:
            self.settings.setValue(f"{self._key(project)}/zoom", float(zoom))

    def place(self, project: Path) -> tuple[Optional[int], Optional[float]]:
        image = self.settings.value(f"{self._key(project)}/image", None)
        zoom = self.settings.value(f"{self._key(project)}/zoom", None)
        return (int(image) if image not in (None, "") else None, float(zoom) if zoom not in (None, "") else None)
