"""Build hook: compile conveyor's optional C accelerator, src/conveyor/_speedups.c.

conveyor works without it (conveyor.channel falls back to pure Python), so a
machine without a C compiler still installs conveyor: the failure is reported
as a warning and the wheel stays pure Python. Set CONVEYOR_NO_EXTENSIONS=1 to
skip the build on purpose.

setuptools does the compiling (it knows every platform's compiler and flags).
A regular wheel gets the compiled module added; an editable install
(``pip install -e .``) gets it copied next to the sources, where the editable
install imports conveyor from; reinstall after changing the C file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("src") / "conveyor" / "_speedups.c"


def compile_speedups(root: Path, work: Path) -> Path:
    """Compile the extension into ``work``; return the path of the built module."""
    from setuptools import Distribution, Extension  # type: ignore[import-untyped,unused-ignore]

    extension = Extension("conveyor._speedups", [str(root / SOURCE)])
    distribution = Distribution({"name": "conveyor", "ext_modules": [extension]})
    command = distribution.get_command_obj("build_ext")
    command.build_lib = str(work / "lib")
    command.build_temp = str(work / "temp")
    command.ensure_finalized()
    command.run()
    (built,) = command.get_outputs()
    return Path(built)


class SpeedupsBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        if os.environ.get("CONVEYOR_NO_EXTENSIONS", "") not in ("", "0"):
            self.app.display_info("conveyor: CONVEYOR_NO_EXTENSIONS is set: no C accelerator")
            return
        root = Path(self.root)
        self._work = Path(tempfile.mkdtemp(prefix="conveyor-speedups-"))
        try:
            built = compile_speedups(root, self._work)
        except Exception as exc:  # no compiler, no headers, no setuptools...
            self.app.display_warning(
                f"conveyor: the optional C accelerator was not built ({exc!r}); "
                "conveyor will use its pure-Python fallback"
            )
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version == "editable":
            shutil.copy2(built, root / "src" / "conveyor" / built.name)
        else:
            build_data["force_include"][str(built)] = f"conveyor/{built.name}"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        work = getattr(self, "_work", None)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
