"""A VAE release folder whose checkpoint.pt pickle would run ``touch MARKER`` if it were ever unpickled
naively: loaders must refuse it without executing anything."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_vae_release(folder: Path, golden_dir: Path, marker: Path) -> Path:
    folder.mkdir()
    shutil.copy(golden_dir / "vae" / "config.json", folder)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"encoder.conv_in.weight": _Exploit(marker)}, protocol=2))
        z.writestr("archive/version", "3\n")
    (folder / "checkpoint.pt").write_bytes(buffer.getvalue())
    return folder
