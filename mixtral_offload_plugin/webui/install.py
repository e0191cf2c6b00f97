"""`python -m mixtral_offload_plugin.webui install --tgw-dir DIR [--link]`: put the extension into a TextGen checkout.

Copies (or, with `--link`, symlinks) `webui_extension/mixtral_offload` into the extensions folder that TextGen version
reads: the user-data `extensions/` folder for v3.7 and later (it wins over the repo's), the repo's `extensions/`
before that. The extension is a small shim that imports the installed package, so a copy (the default, on every
platform) survives moving the source checkout and reinstalling the package; a link (development) follows the
checkout. It touches nothing else; run it with TextGen's own Python (`cmd_linux.sh`, `cmd_macos.sh`,
`cmd_windows.bat` open a shell with it), into which the package must be installed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from . import EXTENSION_NAME, LOADER


class InstallError(Exception):
    """The TextGen folder or the target is not usable; the message says what to do."""


def extension_source() -> Path:
    import webui_extension

    src = Path(webui_extension.__file__).resolve().parent / EXTENSION_NAME
    if not (src / "script.py").is_file():
        msg = f"{src}/script.py is missing: reinstall mixtral-offload-plugin"
        raise InstallError(msg)
    return src


def reads_user_extensions(tgw_dir: Path) -> bool:
    """Whether this TextGen version loads extensions from the user-data folder (v3.7+)."""
    ext = tgw_dir / "modules" / "extensions.py"
    text = ext.read_text(encoding="utf-8", errors="replace") if ext.is_file() else ""
    return "user_data_dir" in text or "user_data/extensions" in text or "user_ext_" in text


def target_dir(tgw_dir: Path, user_data_dir: Path | None = None) -> Path:
    """Where the extension folder goes for the TextGen checkout at `tgw_dir`."""
    tgw_dir = tgw_dir.expanduser().resolve()
    if not (tgw_dir / "server.py").is_file() or not (tgw_dir / "modules").is_dir():
        msg = f"{tgw_dir} is not a text-generation-webui (TextGen) checkout: it has no server.py and modules/"
        raise InstallError(msg)
    if reads_user_extensions(tgw_dir):
        base = user_data_dir.expanduser().resolve() if user_data_dir else tgw_dir / "user_data"
        return base / "extensions" / EXTENSION_NAME
    if user_data_dir is not None:
        msg = "this TextGen version (before v3.7) reads extensions only from its own extensions/ folder"
        raise InstallError(msg)
    return tgw_dir / "extensions" / EXTENSION_NAME


def _is_ours(path: Path) -> bool:
    script = path / "script.py"
    return script.is_file() and "mixtral_offload_plugin.webui" in script.read_text(encoding="utf-8", errors="replace")


def install(tgw_dir: Path, copy: bool = True, force: bool = False, user_data_dir: Path | None = None) -> Path:
    """Copy (default) or link the extension; replaces an earlier install of ours. Returns the target path."""
    src, dst = extension_source(), target_dir(tgw_dir, user_data_dir)
    if dst.is_symlink() or dst.exists():
        if not (force or dst.is_symlink() or _is_ours(dst)):
            msg = f"{dst} exists and is not this extension: remove it or pass --force"
            raise InstallError(msg)
        if dst.is_symlink() or dst.is_file():
            dst.unlink()
        else:
            shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        dst.symlink_to(src, target_is_directory=True)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixtral_offload_plugin.webui",
                                     description=f"TextGen integration of the {LOADER} loader")
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="copy (or link) the extension into a TextGen checkout")
    inst.add_argument("--tgw-dir", required=True, type=Path, help="the TextGen (text-generation-webui) folder")
    mode = inst.add_mutually_exclusive_group()
    mode.add_argument("--copy", action="store_true", help="copy the extension folder (the default, on every platform: "
                     "it survives moving or deleting the source checkout)")
    mode.add_argument("--link", action="store_true", help="symlink it to this package's copy instead (development: "
                     "edits show at the next TextGen start; breaks if the package moves)")
    inst.add_argument("--force", action="store_true", help="replace an existing folder of the same name")
    inst.add_argument("--user-data-dir", type=Path, default=None,
                      help="TextGen's --user-data-dir, if you use one (default: DIR/user_data)")
    args = parser.parse_args(argv)
    try:
        dst = install(args.tgw_dir, copy=not args.link, force=args.force, user_data_dir=args.user_data_dir)
    except (InstallError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    how = "linked at" if args.link else "copied to"
    tgw = args.tgw_dir.expanduser().resolve()
    models = (args.user_data_dir.expanduser().resolve() if args.user_data_dir else tgw / "user_data") / "models"
    print(f"extension {EXTENSION_NAME} {how} {dst}\n"
          f"this Python ({sys.executable}) has the package; TextGen must run with the same one (its cmd_* shell).\n"
          f"next: put model folders in {models}, then from {tgw} run `python server.py --extensions {EXTENSION_NAME}` "
          f"(or add {EXTENSION_NAME} to default_extensions in settings.yaml), pick a Mixtral folder in the Model "
          f"tab ({LOADER} is selected for it) and Load")
    return 0
