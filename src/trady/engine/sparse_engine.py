"""Turn any nn.Module into one whose training step updates only selected input channels, for real.

`SparseEngine(model, example_input)` prepares the model in place (no copy, no new module tree):
- every Conv2d/Linear except the classifier computes through ChannelSparse*Fn: it keeps its weight
  and, when selected, only x[:, selected]; its weight gradient exists only for the selected slice;
- every BatchNorm2d becomes a frozen per-channel affine map, folded into the Conv2d right before it
  where there is one (`fold_bn`); ReLU/ReLU6/Hardtanh and train-mode Dropout keep bit masks;
  MaxPool2d keeps a 1-byte window position per output, AvgPool2d and global pooling keep nothing;
- the classifier stays a stock layer and is trained in full; biases only with `train_bias`.
The module classes are in `trady.engine.modules`; `SWAPS` below is the table of handled kinds.
The model keeps its parameter names: `model.state_dict()` is a normal checkpoint. Each layer's
trainable slice is one tensor for the engine's whole life (select() resizes it in place), so an
optimizer built from `engine.parameters()` before or after any select() stays valid; after every
optimizer step (a public global step hook) the updated slices are written into the model's weights,
so the forward only reads them: eager and torch.compile alike.
Changing the selection is `engine.select(...)`: no rebuild. `engine.restore()` undoes everything.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trady.core.errors import TradyError
from trady.engine import functions, layer_kinds, slices
from trady.engine import modules as prepared
from trady.engine.batchnorm import batchnorm_training, batchnorms, check_mode
from trady.engine.config import EngineConfig
from trady.engine.costs import PRECISION_OF_DTYPE, CostTable, Selection, analyze
from trady.engine.modules import LayerState
from trady.memory.kept_bytes import MemoryReport, SavedTensors, measure_saved_bytes, optimizer_state_bytes, storage_key

# Parameter-free leaf modules whose stock backward keeps nothing (or nothing we could avoid).
_PASSTHROUGH = (nn.Identity, nn.Flatten, nn.ZeroPad2d, nn.ConstantPad2d, nn.Unflatten)
# Kept by stock autograd; their saved tensors are measured and reported in the "rest".
_STOCK_ALLOWED = (nn.MaxPool2d, nn.AvgPool2d)  # only variants the engine's own pooling does not cover


def _is_stock_allowed(module: nn.Module) -> bool:
    """A pass-through or stock-allowed kind with its stock forward (a subclass's own forward is unknown)."""
    return any(isinstance(module, b) and type(module).forward is b.forward for b in _PASSTHROUGH + _STOCK_ALLOWED)


def _computes_itself(module: nn.Module) -> bool:
    """Whether the guard must see the module: a leaf whose calls the functional-call mode does not check
    (trady.engine.layer_kinds: the mode checks the forward code of every module with children, PyTorch's own such as
    nn.TransformerEncoderLayer included, and of subclasses of supported kinds such as timm's LayerNorm2d)."""
    return next(module.children(), None) is None and not layer_kinds.checked_by_mode(module)


SUPPORTED_KINDS = (
    "Conv2d (any groups/stride/dilation/padding), Linear, BatchNorm2d (frozen or train), ReLU, ReLU6, Hardtanh, "
    "AdaptiveAvgPool2d(1), AvgPool2d, MaxPool2d, Identity, Dropout, Flatten, ZeroPad2d, ConstantPad2d, Unflatten, "
    + layer_kinds.SUPPORTED_KINDS
)

# The handled module kinds: stock class -> the engine class it becomes (nn.AdaptiveAvgPool2d(1) is
# special-cased in `_swap_target`). A new kind is one entry here plus its class in sparse_modules.
SWAPS: dict[type, type] = {
    nn.MaxPool2d: prepared.ArgmaxMaxPool2d,
    nn.AvgPool2d: prepared.ShapeOnlyAvgPool2d,
    nn.Conv2d: prepared.SparseConv2d,
    nn.Linear: prepared.SparseLinear,
    nn.BatchNorm2d: prepared.FrozenBatchNorm2d,
    nn.ReLU: prepared.MaskedReLU,
    nn.ReLU6: prepared.MaskedReLU6,
    nn.Hardtanh: prepared.MaskedHardtanh,
    nn.Dropout: prepared.MaskedDropout,
    **layer_kinds.SWAPS,  # smooth activations, LayerNorm, MultiheadAttention
}


def _engine_classes() -> frozenset:
    return frozenset(SWAPS.values()) | {prepared.GlobalAvgPool2d, prepared.FoldedBatchNorm2d, prepared.TrainBatchNorm2d}


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


class SparseEngine:
    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        config: EngineConfig | None = None,
    ) -> None:
        self.model = model
        self.config = config or EngineConfig()
        prepared = next((n for n, m in model.named_modules() if type(m) in _engine_classes()), None)
        if prepared is not None:
            raise TradyError(
                f"module {prepared!r} is already prepared by a SparseEngine; call that engine's restore() first"
            )
        if self.config.mask_bits not in (1, 8):
            raise TradyError(f"mask_bits must be 1 or 8, got {self.config.mask_bits}")
        check_mode(self.config.batchnorm)
        self.costs: CostTable = analyze(model, example_input=example_input, classifier=self.config.classifier)
        self.classifier_name = self.costs.classifier
        self.classifier = model.get_submodule(self.classifier_name)
        # One sample of the example: select() runs it once to find every unsupported module on the path.
        self._example = example_input[:1].detach()
        self._costs_at: dict[tuple, CostTable] = {tuple(example_input.shape[1:]): self.costs}
        self._orig_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self._orig_class: dict[str, type] = {}
        self._hooks: list = []
        self._guarded: dict[str, str] = {}  # strict: module name -> kind of every guarded module
        self._offenders: dict[str, str] = {}  # guarded modules met on the backprop path in this forward
        self._forward_depth = 0  # nested model forwards (a forward inside a forward hook): only the outermost counts
        self._bn_notice = [False]  # model.train() warning: once per engine
        self._slice_optimizers: weakref.WeakSet = weakref.WeakSet()  # optimizers seen stepping the slices
        self.layers: dict[str, nn.Module] = {}
        self.selection: Selection = {}
        self.restored = False
        try:
            self._prepare()
            if self.config.fold_bn and self.config.batchnorm == "frozen":
                self._fold_batchnorms(example_input)
        except BaseException:
            self.restore()  # never leave a half-prepared model behind
            raise
        slices.install_step_hooks()
        slices.ENGINES.add(self)

    # -- preparation ------------------------------------------------------------------------
    def _prepare(self) -> None:
        model, cfg = self.model, self.config
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.classifier.parameters():
            p.requires_grad_(True)
        classifier_modules = {self.classifier_name} | {
            f"{self.classifier_name}.{n}" for n, _ in self.classifier.named_modules() if n
        }
        for name, module in model.named_modules():
            if name in classifier_modules:
                continue
            target = self._swap_target(name, module)
            if target is not None:
                self._swap(name, module, target)
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    module.trady = LayerState(name, w_slice=slices.empty_slot(module))
                if isinstance(module, nn.Conv2d):
                    module.trady_padding, module.trady_extra_pad = prepared.numeric_padding(module)
                if isinstance(module, prepared.MaskedClamp):
                    module.trady_bits = cfg.mask_bits
                if isinstance(module, nn.BatchNorm2d):
                    module.trady_notice = self._bn_notice
                layer_kinds.configure(name, module, cfg)
                if cfg.train_bias and isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                    if module.bias is not None:
                        module.bias.requires_grad_(True)
            elif cfg.strict and _computes_itself(module) and not _is_stock_allowed(module):
                self._guarded[name] = type(module).__name__
                self._hooks.append(module.register_forward_pre_hook(self._guard(name), with_kwargs=True))
        self.layers = {n: model.get_submodule(n) for n in self.costs.names}
        slices.register_layers(self.layers.values())
        engine = weakref.ref(self)

        def sync_first(*_):  # a state_dict always holds the trained values (slices edited by hand included)
            e = engine()
            if e is not None and not e.restored:
                e.sync()

        def reread_slices(*_):  # after a load the weights are the newest values: the slices follow them
            e = engine()
            if e is not None and not e.restored:
                e._reread_slices()

        self._hooks.append(model.register_state_dict_pre_hook(sync_first))
        self._hooks.append(model.register_load_state_dict_pre_hook(sync_first))
        self._hooks.append(model.register_load_state_dict_post_hook(reread_slices))
        self._hooks += layer_kinds.install(self)  # functional calls (F.silu, x * gate, ...) in the forward code
        if self._guarded:
            self._hooks.append(model.register_forward_pre_hook(lambda m, a: self._enter_forward()))
            self._hooks.append(model.register_forward_hook(lambda m, a, out: self._leave_forward(), always_call=True))

    def _fold_batchnorms(self, example_input: torch.Tensor) -> None:
        """Fold each frozen BatchNorm that takes exactly the output of the prepared Conv2d before it.

        Candidates are adjacent (conv, BN) children of an nn.Sequential with the stock forward, where the
        conv's output goes nowhere else; one no-grad forward then checks that each such BN is called
        once, on that very output tensor (a BN reused elsewhere, or called out of order, stays as is).
        """
        pairs: dict[str, tuple[nn.Module, nn.Module]] = {}
        for pname, parent in self.model.named_modules():
            if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
                continue
            kids = list(parent.named_children())
            for (a, conv), (_, bn) in zip(kids, kids[1:]):
                name = f"{pname}.{a}" if pname else a
                if (
                    type(conv) is prepared.SparseConv2d
                    and name in self.costs.by_name
                    and type(bn) is prepared.FrozenBatchNorm2d
                    and bn.num_features == conv.out_channels
                ):
                    pairs[name] = (conv, bn)
        if not pairs:
            return
        outputs: dict[str, torch.Tensor] = {}
        calls: dict[str, list[bool]] = {name: [] for name in pairs}
        handles = []
        for name, (conv, bn) in pairs.items():
            handles.append(conv.register_forward_hook(lambda m, a, out, n=name: outputs.__setitem__(n, out)))
            handles.append(bn.register_forward_pre_hook(lambda m, a, n=name: calls[n].append(a[0] is outputs.get(n))))
        try:
            with torch.no_grad():
                self.model(example_input[:1])
        finally:
            for h in handles:
                h.remove()
            outputs.clear()
        for name, (conv, bn) in pairs.items():
            if calls[name] == [True]:
                conv.trady.fold = bn
                bn.__class__ = prepared.FoldedBatchNorm2d  # restore() returns it to its original class

    def _swap_target(self, name: str, module: nn.Module) -> type | None:
        """The engine class this module becomes, None to leave it alone; raises if it cannot be handled."""
        if type(module) is nn.AdaptiveAvgPool2d and module.output_size in (1, (1, 1)):
            return prepared.GlobalAvgPool2d
        base = next((b for b in SWAPS if type(module) is b), None)
        if base is None:
            base = next((b for b in SWAPS if isinstance(module, b)), None)
            if base is None:
                return None
            if type(module).forward is not base.forward:
                if isinstance(module, (nn.Conv2d, nn.Linear, nn.MultiheadAttention)) and name in self.costs.by_name:
                    raise TradyError(
                        f"layer {name!r} is a {type(module).__name__} with its own forward, which the engine "
                        f"cannot run channel-sparse; supported kinds: {SUPPORTED_KINDS}"
                    )
                return None
        if base in (nn.Conv2d, nn.Linear) and name not in self.costs.by_name:
            return None  # never called in the forward pass: nothing to update
        if base is nn.Conv2d and module.padding_mode != "zeros":
            raise TradyError(f"layer {name!r} uses padding_mode={module.padding_mode!r}; accepted: 'zeros'")
        if base is nn.BatchNorm2d and self.config.batchnorm == "train":
            return prepared.TrainBatchNorm2d  # stock: batch statistics in train mode (trady.engine.batchnorm)
        if base is nn.BatchNorm2d and module.running_var is None:
            raise TradyError(
                f"BatchNorm {name!r} has no running statistics (track_running_stats=False); "
                "accepted: BatchNorm2d with running statistics, which trady freezes"
            )
        return SWAPS[base]

    def _swap(self, name: str, module: nn.Module, new_class: type) -> None:
        self._orig_class[name] = type(module)
        module.__class__ = new_class

    # -- strict: unsupported modules on the backprop path -----------------------------------
    def _guard(self, name: str):
        engine = weakref.ref(self)

        def hook(module, args, kwargs):
            e = engine()
            if e is None or e.restored or not torch.is_grad_enabled():
                return None
            inputs = list(args) + list(kwargs.values())
            if any(isinstance(a, torch.Tensor) and a.requires_grad for a in inputs) or any(
                p.requires_grad for p in module.parameters(recurse=False)
            ):
                e._offenders[name] = e._guarded[name]
                if not e._forward_depth:  # called outside the model's forward: nothing to collect
                    e._raise_offenders()
            return None

        return hook

    def _enter_forward(self) -> None:
        self._forward_depth += 1
        if self._forward_depth == 1:
            self._offenders.clear()

    def _leave_forward(self) -> None:
        self._forward_depth = max(0, self._forward_depth - 1)
        if not self._forward_depth and self._offenders:
            self._raise_offenders()

    def _raise_offenders(self) -> None:
        names = ", ".join(f"{n!r} ({kind})" for n, kind in self._offenders.items())
        self._offenders.clear()
        raise TradyError(
            f"module(s) {names} lie on the backprop path; supported kinds: {SUPPORTED_KINDS} "
            "(or EngineConfig(strict=False) to let stock autograd keep their inputs)"
        )

    def _check_path(self) -> None:
        """strict: one forward of the example sample (RNG undone) names every offender: modules, functional calls."""
        if not self.config.strict:
            return
        devices = [self._example.device] if self._example.device.type == "cuda" else []
        # BatchNorms in eval mode: the same path, no running statistics updated from this one sample
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), batchnorm_training(self.model, False):
            self.model(self._example)

    def restore(self) -> nn.Module:
        """Write the trained slices back and return the model to its stock classes and flags."""
        self.sync()
        slices.ENGINES.discard(self)
        for module in self.layers.values():
            slices.SLICE_LAYERS.pop(id(module.trady.w_slice), None)
        for h in self._hooks:
            h.remove()
        for name, cls in self._orig_class.items():
            module = self.model.get_submodule(name)
            module.__class__ = cls
            for attr in [a for a in vars(module) if a.startswith("trady")]:
                del module.__dict__[attr]
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._orig_requires_grad[n])
        self._orig_class.clear()
        self._hooks.clear()
        self.layers = {}  # a restored engine drives nothing: select() then raises
        self.restored = True
        return self.model

    # -- selection ---------------------------------------------------------------------------
    def select(self, selection: Mapping[str, Sequence[int] | torch.Tensor] | None) -> Selection:
        """Update exactly these input channels from now on (None or {}: the classifier only).

        The layers' slice tensors stay the same objects (resized in place): an optimizer built from
        `parameters()` earlier stays valid; a slice whose channels change starts with no optimizer state.
        With strict=True, raises naming every unsupported module on the new backprop path (the previous
        selection then stays in place).
        """
        if self.restored:
            raise TradyError("this engine was restored; prepare the model again with SparseEngine(model, x)")
        slices.check_index_forms(selection or {})
        canonical = self.costs.check_selection(selection or {})
        previous = self.selection
        self.sync()
        self._apply(canonical)
        try:
            self._check_path()
        except Exception:
            self._apply(previous)
            raise
        return canonical

    def _apply(self, canonical: Selection) -> None:
        for name, module in self.layers.items():
            st: LayerState = module.trady
            idx = canonical.get(name)
            idx = None if idx is None else idx.to(module.weight.device)
            if idx is None or st.idx is None:
                if idx is None and st.idx is None:
                    continue
            elif torch.equal(idx, st.idx):
                continue  # the same channels: the same slice, its optimizer state (momentum) carries on
            with torch.no_grad():
                none = torch.empty(0, dtype=torch.int64, device=module.weight.device)
                sliced = functions.gather_slice(module.weight, none if idx is None else idx, slices.groups_of(module))
                st.w_slice.set_(sliced)
            st.idx = idx
            st.channels = () if idx is None else tuple(idx.tolist())
            st.w_slice.grad = None
            for optimizer in list(self._slice_optimizers):  # its state (momentum) was for other channels
                optimizer.state.pop(st.w_slice, None)
        self.selection = canonical

    def check_optimizer(self, optimizer: torch.optim.Optimizer, ids: set[int]) -> None:
        """Before a step: an optimizer holding a prepared layer's frozen full weight and no slice was built
        from model.parameters(): it would never train a selected channel. A head-only one is fine."""
        if self.restored:
            return
        if any(id(m.trady.w_slice) in ids for m in self.layers.values()):
            self._slice_optimizers.add(optimizer)
            return
        frozen = next((name for name, m in self.layers.items() if id(m.weight) in ids), None)
        if frozen is not None:
            raise TradyError(
                f"this optimizer holds the frozen weight of prepared layer {frozen!r} but no weight slice (built "
                "from model.parameters()?), so it never trains a selected channel; accepted: an optimizer built "
                "from engine.parameters() or the tuner's start_epoch()/parameters() (before or after select())"
            )

    def _reread_slices(self) -> None:
        for module in self.layers.values():
            st: LayerState = module.trady
            if st.idx is not None:
                with torch.no_grad():
                    st.w_slice.copy_(functions.gather_slice(module.weight, st.idx, slices.groups_of(module)))

    def sync(self) -> None:
        """Write the current slice values into the model's own weights (only needed after editing a slice by
        hand: every optimizer step already does it)."""
        for module in self.layers.values():
            slices.write_slice_if_changed(module)

    def slice_parameters(self) -> list[torch.Tensor]:
        """The selected layers' slices (non-empty)."""
        return [m.trady.w_slice for m in self.layers.values() if m.trady.idx is not None]

    def parameters(self) -> list[torch.Tensor]:
        """Everything an optimizer should update, valid across selections: every layer's slice (empty
        while unselected), the classifier, enabled biases."""
        params = [m.trady.w_slice for m in self.layers.values()]
        ids = {id(p) for p in params}
        for p in self.model.parameters():
            if p.requires_grad and id(p) not in ids:
                params.append(p)
        return params

    def slice_grad_norms(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (channel indices, per-channel weight-gradient L2 norm)} after a backward."""
        out = {}
        for name, module in self.layers.items():
            st: LayerState = module.trady
            if st.idx is not None and st.w_slice.grad is not None:
                out[name] = (st.idx, functions.slice_channel_norms(st.w_slice.grad, slices.groups_of(module)))
        return out

    # -- measurement -------------------------------------------------------------------------
    def _precision(self) -> str:
        """Slot precision of the updated weights (the kept slices share their dtype)."""
        for module in self.layers.values():
            return PRECISION_OF_DTYPE.get(module.weight.dtype, "fp32")
        return "fp32"

    def costs_for(self, x: torch.Tensor) -> CostTable:
        """The cost table at the size of input `x` (`costs` is the example's): activation units follow it."""
        shape = tuple(x.shape[1:])
        if shape not in self._costs_at:
            table = analyze(self.model, example_input=x[:1], classifier=self.classifier_name)
            if table.names != self.costs.names:
                raise TradyError(
                    f"an input of shape {tuple(x.shape)} calls other layers than the example "
                    f"{tuple(self._example.shape)}; accepted: inputs that run the same layers"
                )
            self._costs_at[shape] = table
        return self._costs_at[shape]

    def measure_saved(self, step: Callable[[], torch.Tensor]) -> tuple[SavedTensors, int]:
        """Run `step()` (forward + loss) counting every byte kept for backward.

        Returns the count (`attributed`: what the BatchNorm layers keep) and the bytes of its budgeted part
        (the kept input slices of selected channels).
        """
        budget_keys: set[tuple] = set()

        def on_saved(t: torch.Tensor) -> None:
            budget_keys.add(storage_key(t))

        for module in self.layers.values():
            module.trady.on_saved = on_saved
        try:
            # The slices and their channel indices are engine state that lives on anyway: no extra memory.
            persistent = self.slice_parameters()
            persistent += [m.trady.idx for m in self.layers.values() if m.trady.idx is not None]
            saved = measure_saved_bytes(self.model, step, exclude=persistent, attribute_to=batchnorms(self.model))
        finally:
            for module in self.layers.values():
                module.trady.on_saved = None
        return saved, sum(saved.per_storage.get(k, 0) for k in budget_keys)

    def measure_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> MemoryReport:
        """One real forward/backward (and optimizer step, if given) with every kept byte counted."""
        params = self.parameters()
        for p in params:
            p.grad = None
        saved, budget_act = self.measure_saved(lambda: loss_fn(self.model(x), y))
        saved.loss.backward()
        slice_ids = {id(p) for p in self.slice_parameters()}
        budget_grad = sum(p.grad.nbytes for p in params if id(p) in slice_ids and p.grad is not None)
        other_grad = sum(p.grad.nbytes for p in params if id(p) not in slice_ids and p.grad is not None)
        opt_bytes = 0
        if optimizer is not None:
            optimizer.step()
            opt_bytes = optimizer_state_bytes(optimizer)
        return MemoryReport(
            batch_size=int(x.shape[0]),
            saved_bytes=saved.total,
            budgeted_activation_bytes=budget_act,
            budgeted_grad_bytes=budget_grad,
            other_grad_bytes=other_grad,
            optimizer_state_bytes=opt_bytes,
            analytic_budgeted_bytes=self.costs_for(x).selection_bytes(
                self.selection, batch_size=int(x.shape[0]), precision=self._precision()
            ),
            saved_by_kind=saved.by_dtype,
            batchnorm_kept_bytes=saved.attributed,
        )
