"""QAT in your own training loop: load a --qat prepared artifact as a module, train it, save it back.

    from quantcli import training
    model = training.load("w/calibrated")          # a torch.nn.Module, in eval mode
    model.train()                                  # safe: rewrites dropout/BN in the graph
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
    model.freeze_bn(); model.freeze_observers()    # when your schedule says so
    training.save(model, "w/trained")              # then: quantcli convert w/trained -o w/converted

`.train()`/`.eval()` on the bare exported module raise; QatModule's switch them through torchao's
graph rewrite and keeps a BN freeze across the switch (torchao's rewrite would undo it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantcli import _torch, artifacts
from quantcli.artifacts import Artifact
from quantcli.errors import ArtifactError
from quantcli.stages.base import StageResult, carry_program, produce, recipe_of, restore_prepared

INPUT_STAGES = ("prepared", "calibrated", "trained")


class QatModule(_torch.torch.nn.Module):
    """A fake-quantized (QAT-prepared) module that can switch between training and eval mode."""

    def __init__(self, prepared: Any, source: Artifact, bn_frozen: bool = False):
        super().__init__()
        self.prepared = prepared
        self.source = source
        self.bn_frozen = bn_frozen
        self.train(False)

    def forward(self, *args: Any) -> Any:
        return self.prepared(*args)

    def train(self, mode: bool = True) -> QatModule:
        if mode:
            _torch.to_train(self.prepared, bn_frozen=self.bn_frozen)
        else:
            _torch.to_eval(self.prepared)
        for module in self.modules():  # nn.Module.train would call the exported module's, which raises
            module.training = mode
        return self

    def freeze_bn(self) -> QatModule:
        """From now on batch norm uses and keeps its running statistics, as the converted model will."""
        self.bn_frozen = True
        if self.training:
            _torch.freeze_bn(self.prepared)
        return self

    def freeze_observers(self) -> QatModule:
        """Stop updating quantization ranges (they update in eval mode too until frozen)."""
        _torch.disable_observers(self.prepared)
        return self

    @property
    def observers_frozen(self) -> bool:
        return _torch.observers_frozen(self.prepared)

    def prepared_state(self) -> dict[str, Any]:
        """The prepared module's state_dict on the CPU, as a trained artifact stores it.

        Its `_metadata` is kept: torchao observers read their version from it and, without one,
        reset their `eps` buffer to float32's on load.
        """
        state = self.prepared.state_dict()
        cpu = type(state)((k, v.detach().cpu()) for k, v in state.items())
        cpu._metadata = getattr(state, "_metadata", {})
        return cpu


def load(path: str | Path) -> QatModule:
    """A prepared, calibrated or trained --qat artifact as a QatModule (eval mode)."""
    return from_artifact(artifacts.open_artifact(path, INPUT_STAGES, "training.load"))


def require_qat(source: Artifact) -> Artifact:
    if not source.manifest["qat"]:
        raise ArtifactError(
            f"{source.path} was prepared for post-training quantization",
            "QAT needs `quantcli prepare CAPTURED -o PREPARED --qat`",
        )
    return source


def from_artifact(source: Artifact) -> QatModule:
    require_qat(source)
    return QatModule(restore_prepared(source), source, bool(source.manifest.get("bn_frozen", False)))


def trained_fields(source: Artifact, model: QatModule) -> dict[str, Any]:
    """Manifest fields of a trained artifact: what restore needs beyond the state_dict."""
    return {
        "qat": True,
        "io": source.manifest["io"],
        "bn_frozen": model.bn_frozen,
        "observers_frozen": model.observers_frozen,
    }


def write(model: QatModule, folder: Path) -> None:
    carry_program(model.source, folder)
    _torch.save_state(model.prepared_state(), folder / artifacts.STATE)


def save(model: QatModule, out: str | Path, *, force: bool = False) -> StageResult:
    """Freeze the observers and write `out` as a trained artifact that `quantcli convert` accepts.

    The ranges in the artifact are final (convert quantizes with them), so saving freezes them.
    """
    model.freeze_observers()
    source = model.source
    options = {"trained_by": "quantcli.training.save", "state_sha256": _state_digest(model)}

    def body(st: Any) -> dict[str, Any]:
        write(model, st.tmp)
        return trained_fields(source, model)

    return produce(
        "trained", Path(out), recipe=recipe_of(source), parent=source, options=options, data={}, force=force, body=body
    )


def _state_digest(model: QatModule) -> str:
    """sha256 over the state's names, dtypes, shapes and bytes: equal states, equal digests."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.prepared_state().items()):
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().view(-1).view(_torch.torch.uint8).numpy().tobytes())
    return digest.hexdigest()
