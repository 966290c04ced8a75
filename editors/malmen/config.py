"""MALMEN's hyper-network configuration: what a network is for (model shape, edited layers) and its
size, and the check that a network fits a model (Tan, Zhang & Fu, ICLR 2024, "Massive Editing for
Large Language Models via Meta Learning", §3)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..model_spec import spec_for


@dataclass(frozen=True)
class HyperConfig:
    """What a hyper-network is for (model shape, edited layers) and its own size."""

    layers: tuple[int, ...]  # edited MLP output projections, ascending
    d_in: int  # key width of those layers (the MLP's hidden width)
    d_out: int  # value width (the model width)
    model_type: str  # config.model_type of the model it was trained on
    n_model_layers: int
    rank: int = 128  # width of each residual block's bottleneck
    n_blocks: int = 2
    lm_batch: int = 32  # facts per LM pass (chunking: memory, not results)
    net_batch: int = 4096  # tokens per hyper-network pass

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"HyperConfig.layers must be ascending and unique: {self.layers}")
        for name in ("d_in", "d_out", "rank", "n_blocks", "lm_batch", "net_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"HyperConfig.{name} must be ≥ 1")

    @classmethod
    def for_model(cls, model, layers: tuple[int, ...] | None = None, **kw) -> "HyperConfig":
        """The default: the last fifth of the blocks (MALMEN and MEND edit the top MLPs)."""
        spec = spec_for(model)
        n = spec.n_layers(model)
        layers = tuple(layers) if layers else tuple(range(n - max(1, n // 5), n))
        if max(layers) >= n:
            raise ValueError(f"layers {layers} out of range for {n} layers")
        d_out, d_in = spec.mlp_dims(model, layers[0])
        return cls(layers=layers, d_in=d_in, d_out=d_out, model_type=model.config.model_type,
                   n_model_layers=n, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HyperConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown hyper-network setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)



def check_compatible(cfg: HyperConfig, model) -> None:
    """A clear error when a hyper-network was trained for another model shape."""
    spec = spec_for(model)
    n = spec.n_layers(model)
    d_out, d_in = spec.mlp_dims(model, cfg.layers[0] if cfg.layers[0] < n else 0)
    got = (model.config.model_type, n, d_in, d_out)
    want = (cfg.model_type, cfg.n_model_layers, cfg.d_in, cfg.d_out)
    if got != want:
        raise ValueError(f"the hyper-network was trained for a {want[0]} with {want[1]} layers and MLP "
                         f"{want[2]}→{want[3]}; this model is a {got[0]} with {got[1]} layers and MLP "
                         f"{got[2]}→{got[3]}")
