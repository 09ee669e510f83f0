"""What a modality is at the edges of the system, and the registry of modalities by name.

A modality's spec is one class in one module (`modalities/image.py`, `modalities/text.py`, ...):

    column / folder     the manifest column holding a sample's value, and for a modality kept as
                        files, the folder of a stage's output that holds them (`images`)
    content / load      a manifest value -> the bytes that key the feature cache / what its encoders take
    settings            the preprocessing the model folder records (`config.json: inputs.<modality>`),
                        so that serving reads it from the model, never from params (timm's pretrained_cfg)
    check               a request's raw value -> (what the Predictor takes or None, its inference-log columns);
                        `http` says how the HTTP API takes it: an uploaded file (base64 in JSON) or a string
    stats / measure     the input statistics the inference log keeps and the reference measures
    log_fields          further inference-log columns `check` fills (not drift-checked: a file's format, bytes)
    keep_share / kept   the share of requests whose raw input the log keeps by default (`package.log.keep`
    / restore           overrides it), the (format, bytes) it keeps, and how an export of labelled feedback
                        turns them back into a manifest value (a file under `folder`, or the value itself)
    preview_share       a small preview of a value (a thumbnail, a truncated text, a spectrogram) as
    / preview           (MIME type, bytes) for drift reviews, and the share of requests the log keeps one for
                        (`package.log.previews` overrides it); the reference keeps one per item; None: no preview
    value / example     what counts as "missing", and a valid input (package's smoke test, warm-up)
    clean / missing     clean's rule: a raw manifest value -> its clean-manifest fields (`column` and
                        `clean_fields`), or `Dropped` with the reason; the drop of a row without it
    dedup_key           the clean-manifest column that identifies a value's content: duplicates are rows
                        alike in every modality's key, and a file's content under two labels is a conflict
    validation_columns  the columns and Great Expectations expectations validate adds for the rows
    / expectations      that have the modality
    augment             augment's seeded views of a training value (a new file, or a perturbed value);
                        a modality without one keeps its value in every view

Edges loop over `specs_for(modalities)` of the data or of the served model; `register_modality`
adds one (a plugin or a test), like the encoder and fusion-head registries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mmfusion.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

HTTP_KINDS = ("file", "text")  # an uploaded file (base64 in a JSON item) | a string field


class ModalitySpec:
    """One modality at the edges; instances carry the project root and the recorded preprocessing settings."""

    name: ClassVar[str]
    column: ClassVar[str]
    folder: ClassVar[str | None] = None  # files under <stage output>/<folder>/; None: the value is in the manifest
    http: ClassVar[str] = "file"
    stats: ClassVar[tuple[str, ...]] = ()  # input statistics: inference-log columns, measured on the reference too
    log_fields: ClassVar[tuple[str, ...]] = ()  # further inference-log columns (not drift-checked)
    # SQL types of those columns where not the default (stats: float, log fields: text): {column: float|int|text}
    column_types: ClassVar[dict[str, str]] = {}
    keep_share: ClassVar[float] = 0.0  # share of requests whose raw input the log keeps (package.log.keep overrides)
    # share of requests whose `preview` the log keeps (package.log.previews overrides); a modality whose
    # `preview` gives None has none whatever its share
    preview_share: ClassVar[float] = 1.0
    parallel_load: ClassVar[bool] = False  # loading is worth DataLoader worker processes (decoding files)
    defaults: ClassVar[dict[str, Any]] = {}  # the settings and their defaults
    clean_fields: ClassVar[dict[str, Any]] = {}  # clean-manifest columns it adds, with a row-without-it's value
    dedup_key: ClassVar[str]  # the clean-manifest column that identifies the content (duplicates, label conflicts)

    def __init__(self, root: str | Path = ".", **settings: Any):
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise ValueError(f"modality {self.name!r} has no setting(s) {unknown}; its settings: {sorted(self.defaults)}")
        self.root = Path(root)
        self.settings: dict[str, Any] = {**self.defaults, **settings}

    @classmethod
    def settings_from_params(cls, params: Any) -> dict[str, Any]:
        """The settings a pipeline run uses (recorded into the model folder by train): the spec's `defaults`
        overridden by `modalities.<name>` in params.yaml (checked against `defaults` when params load)."""
        return {**cls.defaults, **(getattr(params, "modalities", {}) or {}).get(cls.name, {})}

    # -- manifest values (paths relative to `root` for file modalities) ----------------------------

    def present(self, raw: Any) -> bool:
        """Whether a manifest value carries this modality (an empty cell is a missing modality)."""
        return bool(str(raw if raw is not None else "").strip())

    def content(self, value: str) -> bytes:
        """The bytes that identify the value (the feature cache's key)."""
        raise NotImplementedError

    def load(self, value: str) -> Any:
        """The value as the modality's encoders take it (decoded, normalised)."""
        raise NotImplementedError

    def measure(self, value: str) -> dict[str, float]:
        """The input statistics (`stats`) of one manifest value, as the service logs them for a request."""
        return {}

    # -- the Predictor's and the service's side --------------------------------------------------

    def value(self, item_value: Any) -> Any | None:
        """A Predictor input as given -> what the encoder takes, or None when it is missing."""
        return item_value

    def check(self, raw: Any, ctx: Any) -> tuple[Any | None, dict[str, Any]]:
        """A request's raw value -> (Predictor input or None, {log column: value} for `stats` and `log_fields`);
        RequestError on a bad one."""
        raise NotImplementedError

    def kept(self, raw: Any, value: Any, fields: dict[str, Any]) -> tuple[str | None, bytes]:
        """What the inference log keeps of a checked request value (`raw` as sent; `value` and `fields` as
        `check` returned them): (format, bytes). A file modality keeps the uploaded bytes; a value modality
        its checked value."""
        if self.folder:
            return None, bytes(raw)
        return self.http, str(value).encode("utf-8")

    def preview(self, value: Any) -> tuple[str, bytes] | None:
        """A small preview of a value as the Predictor takes it (what `check` and `load` return) for the drift
        report's examples: (MIME type, bytes), a few KB; None when the modality has no preview."""
        return None

    def restore(self, fmt: str | None, data: bytes, out_root: Path, name: str) -> str:
        """A kept input -> its manifest value: a file modality writes `out_root/folder/name<suffix>` and returns
        the path relative to `out_root`; a value modality returns the value."""
        if not self.folder:
            return data.decode("utf-8")
        rel = f"{self.folder}/{name}{self.suffix(fmt)}"
        (out_root / self.folder).mkdir(parents=True, exist_ok=True)
        (out_root / rel).write_bytes(data)
        return rel

    def suffix(self, fmt: str | None) -> str:
        """The file name suffix of a kept file of format `fmt`."""
        return f".{fmt.lower()}" if fmt else ".bin"

    def example(self) -> Any:
        """A valid Predictor input (the package stage's smoke test, the service's warm-up)."""
        raise NotImplementedError

    def parts(self, value: Any, explain: Any) -> Any:
        """The parts of a Predictor input that an explanation attributes a prediction to (`mmfusion.modalities.parts`:
        words, image regions, time segments); `explain` is package.explain (grid sizes). By default the whole
        value is one part."""
        from mmfusion.modalities.parts import WholeParts

        return WholeParts(value)

    # -- the data edges: clean and validate ------------------------------------------------------

    @property
    def described(self) -> str:
        """How clean's messages name a manifest value of the modality ("image path", "text")."""
        return f"{self.name} path" if self.folder else self.name

    def clean(self, raw: str, data: bytes | None, out_root: Path, params: Any) -> dict[str, Any]:
        """A present raw value -> its clean-manifest fields, `column` and `clean_fields`. A file modality gets
        its file's bytes as `data` (clean reads them: a path outside the raw data or an unreadable file is
        `missing_<name>`) and writes its clean file under `out_root/folder`; a value modality gets None.
        Raises `Dropped` with the reason that applies; the limits are read from `params` (`clean`)."""
        raise NotImplementedError

    def missing(self) -> Dropped:
        """The drop of a row without this modality, where `clean.allow_missing_modality` is off."""
        return Dropped(f"missing_{self.name}", f"no {self.described} (clean.allow_missing_modality is off)")

    def validation_columns(self, df: pd.DataFrame, root: Path) -> dict[str, Any]:
        """{column: values} validate adds to the clean manifest (files relative to `root`) for `expectations`."""
        return {}

    def expectations(self, gxe: Any, params: Any, where: Mapping[str, Any]) -> list:
        """The Great Expectations expectations (module `gxe`) of this modality, limits from `params` (the
        `validate` section); each takes `**where`, the row condition that selects the rows that have it."""
        return []

    # -- the training edge: augment -------------------------------------------------------------

    def augment(self, value: str, params: Any, views: Sequence[tuple[int, str]], out_root: Path) -> list[str] | None:
        """Seeded views of a present manifest value, one per `(seed, name)` of `views` (`params`: the `augment`
        section). A file modality writes view `name` under `out_root/folder` and returns the paths relative to
        `out_root`; a value modality returns the perturbed values. None: no augmentation, the views keep the value."""
        return None


class InputDecodeError(ValueError):
    """A modality's value could not be read or decoded (or is outside its limits); `reason` is a short
    machine-readable code (`undecodable_image`, `audio_too_long`, ...). Featurize reports it per row."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Dropped(Exception):
    """A raw row that clean drops: `reason` is its code in reports/clean.json, `detail` the specifics."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


_MODALITIES: dict[str, type[ModalitySpec]] = {}


def register_modality(spec: type[ModalitySpec]) -> type[ModalitySpec]:
    """Add a modality spec (usable as a class decorator); a name is registered once."""
    if spec.name in _MODALITIES and _MODALITIES[spec.name] is not spec:
        raise ValueError(f"modality {spec.name!r} is already registered")
    if spec.http not in HTTP_KINDS:
        raise ValueError(f"modality {spec.name!r}: http must be one of {HTTP_KINDS}, got {spec.http!r}")
    _MODALITIES[spec.name] = spec
    return spec


def unregister_modality(name: str) -> None:
    """Remove a modality (plugins and tests that register their own)."""
    _MODALITIES.pop(name, None)


def list_modalities() -> list[str]:
    """Registered modality names, in registration order."""
    return list(_MODALITIES)


def get_modality(name: str) -> type[ModalitySpec]:
    """The spec class of modality `name`; an unknown name is an error listing the known ones."""
    if name not in _MODALITIES:
        raise UserError(f"unknown modality {name!r}; registered: {', '.join(_MODALITIES)}")
    return _MODALITIES[name]


def build_spec(name: str, root: str | Path = ".", settings: Mapping[str, Any] | None = None) -> ModalitySpec:
    """A spec instance of modality `name` with the given settings (those it does not know are ignored)."""
    cls = get_modality(name)
    known = {k: v for k, v in (settings or {}).items() if k in cls.defaults}
    return cls(root, **known)


def specs_for(modalities: Iterable[str], root: str | Path = ".", settings: Mapping[str, Mapping] | None = None
              ) -> dict[str, ModalitySpec]:  # fmt: skip
    """{modality: spec} for `modalities` (a model's or the data's), each with its settings from `settings`."""
    return {m: build_spec(m, root, (settings or {}).get(m)) for m in modalities}


def modalities_in(columns: Iterable[str]) -> list[str]:
    """The registered modalities whose column a manifest has (the data's modalities), in registration order."""
    have = set(columns)
    return [m for m, spec in _MODALITIES.items() if spec.column in have]


def presence_pattern(present: Iterable[str], modalities: Sequence[str]) -> str:
    """The name of a row's presence pattern: all of `modalities` joined by `+` (`image+text`), `<m>_only` for
    one of several, else the present ones joined (`image+vector`); `none` for none."""
    present = set(present)
    have = [m for m in modalities if m in present]
    if len(have) == 1 and len(modalities) > 1:
        return f"{have[0]}_only"
    return "+".join(have) or "none"


def presence_patterns(modalities: Sequence[str]) -> list[str]:
    """The patterns of rows with at least one of `modalities`: all of them first, the single ones last."""
    return [presence_pattern(c, modalities) for n in range(len(modalities), 0, -1) for c in combinations(modalities, n)]


def stats_of(modality: str) -> tuple[str, ...]:
    """The input statistics of `modality` (inference-log columns); none for a name no spec is registered for."""
    spec = _MODALITIES.get(modality)
    return spec.stats if spec is not None else ()


def _shares(setting: str, attr: str, modalities: Iterable[str], overrides: Mapping[str, float] | None) -> dict[str, float]:
    """{modality: the spec's `attr` share, overridden by `overrides` (the params key `setting`)}; a name there that
    is not one of `modalities`, or a share outside [0, 1], is an error."""
    modalities = list(modalities)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(modalities))
    if unknown:
        raise UserError(f"{setting} names {unknown}, not an input of this model; its inputs: {modalities}")
    bad = {m: v for m, v in overrides.items() if not 0.0 <= float(v) <= 1.0}
    if bad:
        raise UserError(f"{setting}: a share is between 0 and 1, got {bad}")
    return {m: float(overrides.get(m, getattr(get_modality(m), attr))) for m in modalities}


def keep_shares(modalities: Iterable[str], overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """{modality: share of requests whose raw input the inference log keeps}: each spec's `keep_share`, overridden
    by `package.log.keep`; a name there that is not one of `modalities`, or a share outside [0, 1], is an error."""
    return _shares("package.log.keep", "keep_share", modalities, overrides)


def preview_shares(modalities: Iterable[str], overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """{modality: share of requests whose preview the inference log keeps}: each spec's `preview_share`, overridden
    by `package.log.previews` (0 switches a modality's previews off); checked as `keep_shares` checks its own."""
    return _shares("package.log.previews", "preview_share", modalities, overrides)


def settings_from_params(modalities: Iterable[str], params: Any) -> dict[str, dict[str, Any]]:
    """{modality: preprocessing settings} of a pipeline run: what train records into the model folder."""
    return {m: get_modality(m).settings_from_params(params) for m in modalities}


def recorded_settings(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{modality: preprocessing settings} a model folder's config.json records (`inputs`); a model written
    before `inputs` existed kept one block per modality under the modality's own name (`text: {lowercase}`)."""
    modalities = list(config.get("encoders", {}))
    inputs = config.get("inputs") or {}
    return {m: dict(inputs.get(m) or config.get(m) or {}) for m in modalities}


def row_item(row: Mapping[str, Any], specs: Mapping[str, ModalitySpec]) -> dict[str, Any]:
    """One manifest row -> one Predictor item ({modality: loaded value or None}): the one conversion that
    evaluate's raw check, the reference and promotion use (an empty cell is a missing modality)."""
    item = {}
    for m, spec in specs.items():
        raw = row.get(spec.column, "")
        item[m] = spec.load(str(raw)) if spec.present(raw) else None
    return item
