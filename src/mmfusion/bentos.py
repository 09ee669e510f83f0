"""The packaged Bento: the arguments it is built with, the file DVC can see, and the local BentoML store
filled from it on demand. Used by the package stage, promotion and the monitor.

A Bento lives in the BentoML store (BENTOML_HOME, `.bentoml/` under `make`), which DVC knows nothing
about: a fresh clone has no store, so a package stage that DVC skipped left nothing to serve. So the
package stage also exports its Bento to `bentos/<bento name>.tar`, a DVC-cached out: where it is
missing DVC reruns package (or restores it from its cache), and whatever serves, compares or rolls
back a Bento imports it from there when the store lacks it (`ensure_bento`). A Bento that is neither
in the store nor in the archive is one line naming the command that rebuilds it (`BentoMissing`).

The archive is a plain tar (`bentoml import bentos/mmfusion.tar` reads it too): BentoML's own `.bento`
format is xz, which took ~2 minutes for the ~75 MB of a CV bag's weights on 2 busy cores, for a
3% smaller file (safetensors weights hardly compress).
"""

from __future__ import annotations

import logging
import os
import posixpath
import tarfile
import tempfile
from pathlib import Path

import yaml

from mmfusion import compat, paths
from mmfusion.config import PackageParams, params_to_dict
from mmfusion.errors import UserError

log = logging.getLogger(__name__)

REBUILD = "run `make run` (or `dvc repro package`) to build and export it"


class BentoMissing(UserError):
    """A Bento to serve or compare is in neither the BentoML store nor the exported archive."""


def build_bento_args(params: PackageParams, model_tag: str, root: Path) -> dict:
    """The Bento arguments the package stage builds with (`serving/settings.py`'s `load_settings` reads them):
    the model tag and the package params, with a SQLite log's file made absolute against the project root
    (a Bento's own folder is read-only). A URL holding a password is refused: the Bento would carry the
    secret; the password comes at serve time (PGPASSWORD / PGPASSFILE, or MMFUSION_INFERENCE_LOG)."""
    from mmfusion import logdb

    try:
        url = logdb.resolve_url(params.log.url, Path(root).resolve())
    except ValueError as exc:
        raise UserError(f"package.log.url: {exc}") from exc
    if url.password:
        raise UserError(
            f"package.log.url {logdb.masked(url)} holds a password, which the Bento would carry: leave it out and "
            f"give it at serve time (PGPASSWORD or PGPASSFILE, or the whole URL in {logdb.URL_ENV})"
        )
    package = params_to_dict(params)
    package["log"]["url"] = url.render_as_string(hide_password=False)
    return {"model": model_tag, "package": package}


def archive_path(root: Path, bento_tag: str) -> Path:
    """Where the package stage exports the Bento `bento_tag` (one archive per Bento name: the last built)."""
    return Path(root) / paths.BENTOS / f"{str(bento_tag).split(':', 1)[0]}.tar"


def store_dir() -> str:
    """The BentoML store in use (for messages)."""
    return compat.bentoml_home()


def export_bento(bento_tag: str, root: Path) -> Path:
    """Export `bento_tag` from the store to its archive path, atomically (a killed export leaves no half archive)."""
    import bentoml

    path = archive_path(root, bento_tag).resolve()  # BentoML reads a relative path as relative to /
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        written = bentoml.export_bento(bento_tag, str(Path(tmp) / path.name), output_format="tar")
        os.replace(written, path)
    log.info("package: exported %s to %s (%.1f MB)", bento_tag, path, path.stat().st_size / 1e6)
    return archive_path(root, bento_tag)


def in_store(bento_tag: str) -> bool:
    import bentoml

    try:
        bentoml.get(bento_tag)
        return True
    except bentoml.exceptions.NotFound:
        return False


def archived_tag(root: Path, bento_tag: str) -> str | None:
    """The tag of the Bento in `bento_tag`'s archive (from its bento.yaml alone), None when there is no archive."""
    path = archive_path(root, bento_tag)
    if not path.exists():
        return None
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if posixpath.normpath(member.name) == "bento.yaml":
                    info = yaml.safe_load(tar.extractfile(member))
                    return f"{info['name']}:{info['version']}"
    except (tarfile.TarError, OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise BentoMissing(f"{path} is not a readable Bento archive ({exc}): {REBUILD}") from exc
    raise BentoMissing(f"{path} holds no bento.yaml: {REBUILD}")


def ensure_bento(bento_tag: str, root: Path) -> str:
    """`bento_tag`, imported from its archive into the store when the store lacks it; BentoMissing otherwise."""
    import bentoml

    if in_store(bento_tag):
        return bento_tag
    path = archive_path(root, bento_tag)
    found = archived_tag(root, bento_tag)
    if found == bento_tag:
        bentoml.import_bento(str(path.resolve()), input_format="tar")
        log.info("imported Bento %s from %s into the BentoML store %s", bento_tag, path, store_dir())
        return bento_tag
    where = f"{path} holds {found}" if found else f"there is no {path}"
    raise BentoMissing(f"Bento {bento_tag} is not in the BentoML store ({store_dir()}) and {where}: {REBUILD}")


def missing_note(bento_tag: str, root: Path) -> str:
    """'' when `bento_tag` can be served here; else why not, in a few words (for `make live`)."""
    if in_store(bento_tag):
        return ""
    if archived_tag(root, bento_tag) == bento_tag:
        return "not in the BentoML store yet: `make serve` imports it from " + str(archive_path(root, bento_tag))
    return f"NOT in the BentoML store nor in {paths.BENTOS}/: {REBUILD}"


def bento_model_dir(bento_tag: str, model_tag: str, root: Path) -> Path:
    """The folder of model `model_tag` as the Bento `bento_tag` carries it (importing the Bento if needed)."""
    import bentoml

    try:
        return Path(bentoml.models.get(model_tag).path)
    except bentoml.exceptions.NotFound:
        pass
    bento = bentoml.get(ensure_bento(bento_tag, root))
    name, _, version = str(model_tag).partition(":")
    path = Path(bento.path) / "models" / name / version
    if not (path / "config.json").exists():
        raise BentoMissing(f"Bento {bento_tag} carries no model {model_tag} (looked in {path}): {REBUILD}")
    return path
