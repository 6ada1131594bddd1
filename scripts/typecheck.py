"""Type-check core/ and avarc_cli/ under the names they are installed as (avarc, avarc.cli): `make typecheck`.

mypy names a file after its folder (core/io/records.py → core.io.records) and cannot follow the editable
install's import hook, so `from avarc.io.records import ...` would not resolve. This runs mypy with the
[tool.mypy] settings of pyproject.toml over all its ``files`` (extra mypy flags pass through), each source renamed
by pyproject's package-dir mapping; errors still name the file in the repository.
"""

import sys
from pathlib import Path

from mypy import build
from mypy.errors import CompileError
from mypy.main import process_options
from mypy.modulefinder import BuildSource

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib  # mypy's own dependency before Python 3.11

ROOT = Path(__file__).resolve().parent.parent


def installed_name(module: str, package_dir: dict[str, str]) -> str:
    """core.io.records → avarc.io.records; a module outside the mapped folders keeps its name."""
    folder, _, rest = module.partition(".")
    package = {directory: name for name, directory in package_dir.items()}.get(folder)
    if package is None:
        return module
    return f"{package}.{rest}" if rest else package


def main(argv: list[str]) -> int:
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    sources, options = process_options(argv)
    sources = [BuildSource(s.path, installed_name(s.module, package_dir), s.text, s.base_dir) for s in sources]
    messages: list[str] = []

    def show(_file: str | None, new: list[str], _serious: bool) -> None:
        messages.extend(new)
        for message in new:
            print(message, flush=True)

    try:
        build.build(sources, options, flush_errors=show)
    except CompileError:
        return 2
    errors = [m for m in messages if ": error:" in m]
    files = {m.split(":", 1)[0] for m in errors}
    if errors:
        print(f"Found {len(errors)} errors in {len(files)} files (checked {len(sources)} source files)")
        return 1
    print(f"Success: no issues found in {len(sources)} source files")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
