"""The two data parties' models and step functions around the interactive layer.

The guest owns its bottom model ``f_g``, the plaintext interactive part ``W_g, b``, the top
model and the labels; the host owns its bottom model ``f_h``. Per step (§4.1, §4.4):

1. G draws the step's rows from its seeded batch order; H computes ``α = f_h(X_h[rows])``
   (bounded, plus optional embedding noise) and the encrypted F1;
2. G gets ``z_h``, computes ``z = z_h + α_g·W_g + b``, the top model and the loss, and
   ``δ = ∂L/∂z``; it updates its own parameters with the true δ and sends ``δ̃ = Protect(δ)``
   into B1 and B2;
3. H gets ``g_h = δ̃·W_hᵀ`` and back-propagates it through ``f_h``.

:class:`FloatSplitModel` is the same network trained in float64 in one process (both
parties' parts together, no protocol): the reference of test S3 and the "float plaintext"
figure of the quality benchmark. Never use it between real silos.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from protocols.errors import ConfigError, DataError
from vfl.common.checkpoint import Checkpoint
from vfl.models.split import (
    BottomModel,
    ClassWeight,
    LossKind,
    OutputBound,
    Task,
    TopModel,
    binary_loss,
    loss_for,
)
from vfl.privacy.label_protection import (
    MarvellNoise,
    MarvellState,
    ProtectConfig,
    ProtectMode,
    RowNoise,
    embedding_noise,
    new_generator,
    protect,
)
from vfl.splitnn.interactive import GuestLayer, HostLayer


@dataclass(frozen=True)
class TrainConfig:
    """Architecture and optimisation (``d``, ``k``, ``eta_w``, ``a_max`` shared by both).

    Empty widths give linear parts: ``guest_widths = ()`` feeds the guest's features straight
    into ``W_g``; ``host_widths = ()`` makes the host's bottom one linear layer to ``d``
    (bounded to ``±a_max``); ``top_widths = ()`` drops the top model, so ``z`` (``k`` wide) is
    the output and a binary or regression task needs ``k = 1``. All three empty with ``k = 1``:
    a vertical logistic regression.

    ``loss``, ``focal_gamma``, ``class_weight`` and ``pos_weight`` (binary tasks only) stay at
    the guest: the loss is the batch mean of ``w_i·(1 − p_t)^γ·bce_i``
    (:func:`vfl.models.split.binary_loss`), ``w_i = pos_weight`` for positive rows, with
    ``class_weight = "balanced"`` giving ``pos_weight`` = negatives / positives of the
    training rows (:func:`resolve_pos_weight`).
    """

    d: int = 8
    k: int = 8
    guest_widths: tuple[int, ...] = (16, 8)
    host_widths: tuple[int, ...] = (16, 8)
    top_widths: tuple[int, ...] = (1,)
    activation: str = "relu"
    dropout: float = 0.0
    optimizer: str = "Adam"
    learning_rate: float = 0.01
    weight_decay: float = 0.0
    eta_w: float = 0.1
    a_max: float = 8.0
    host_embedding_noise: float = 0.0
    protect: ProtectConfig = field(default_factory=ProtectConfig)
    seed: int = 0
    task: Task = Task.BINARY
    loss: LossKind = LossKind.BCE
    focal_gamma: float = 2.0
    class_weight: ClassWeight = ClassWeight.NONE
    pos_weight: float = 1.0

    def __post_init__(self) -> None:
        for name, kind in (("task", Task), ("loss", LossKind), ("class_weight", ClassWeight)):
            value = getattr(self, name)
            if value not in set(kind):
                choices = ", ".join(m.value for m in kind)
                raise ConfigError(f"{name} = {value!r}: use one of {choices}")
            object.__setattr__(self, name, kind(value))
        for name in ("guest_widths", "host_widths", "top_widths"):
            if any(w < 1 for w in getattr(self, name)):
                raise ConfigError(f"{name} = {list(getattr(self, name))}: widths must be >= 1")
        self._check_outputs()
        self._check_loss()
        if self.task is not Task.BINARY and self.protect.mode is ProtectMode.RR_LABELS:
            raise ConfigError(
                f"protect = rr_labels randomizes binary labels; a {self.task.value} task needs "
                "marvell (the default), gaussian or max_norm (docs/protocol.md §4.7)"
            )
        classes = {Task.BINARY: 2, Task.MULTICLASS: self.outputs}.get(self.task, 1)
        if self.protect.num_classes != classes:  # marvell's two-class rule only for binary
            object.__setattr__(self, "protect", replace(self.protect, num_classes=classes))
        if not 0 < self.eta_w <= 1:
            raise ConfigError(
                f"eta_w = {self.eta_w}: the shared weights need 0 < eta_w <= 1 (§2.2)"
            )
        if self.learning_rate <= 0 or self.a_max <= 0 or self.host_embedding_noise < 0:
            raise ConfigError("learning_rate and a_max must be positive, host noise >= 0")
        if not isinstance(getattr(torch.optim, self.optimizer, None), type):
            raise ConfigError(f"unknown torch optimizer {self.optimizer!r} (e.g. Adam, SGD)")
        if min(self.d, self.k) < 1:
            raise ConfigError("d and k must be positive")

    @property
    def outputs(self) -> int:
        """The model's output width: the top model's last width, or ``k`` without one."""
        return self.top_widths[-1] if self.top_widths else self.k

    def _check_outputs(self) -> None:
        if not self.top_widths:
            if self.task is Task.MULTICLASS and self.k < 3:
                raise ConfigError(
                    "top_widths = () makes z (k wide) the output: a multiclass task then "
                    "needs k = the number of classes (>= 3)"
                )
            if self.task is not Task.MULTICLASS and self.k != 1:
                raise ConfigError(
                    f"top_widths = () makes z (k wide) the output: a {self.task.value} task "
                    f"then needs k = 1, not {self.k} (a linear model: all widths () and k = 1)"
                )
        elif self.task is Task.MULTICLASS and self.outputs < 3:
            raise ConfigError("a multiclass task needs top_widths ending in the number of classes")
        elif self.task is not Task.MULTICLASS and self.outputs != 1:
            raise ConfigError(f"a {self.task.value} task needs top_widths ending in 1")

    def _check_loss(self) -> None:
        if not (math.isfinite(self.focal_gamma) and self.focal_gamma >= 0):
            raise ConfigError(f"focal_gamma = {self.focal_gamma}: must be >= 0")
        if not (math.isfinite(self.pos_weight) and self.pos_weight > 0):
            raise ConfigError(f"pos_weight = {self.pos_weight}: must be > 0")
        if self.class_weight is ClassWeight.BALANCED and self.pos_weight != 1.0:
            raise ConfigError(
                f"class_weight = balanced sets pos_weight from the training rows; remove "
                f"pos_weight = {self.pos_weight} or use class_weight = none"
            )
        weighted = self.class_weight is ClassWeight.BALANCED or self.pos_weight != 1.0
        if self.task is not Task.BINARY and (self.loss is LossKind.FOCAL or weighted):
            raise ConfigError(
                f"loss = focal, class_weight and pos_weight are for binary tasks, not "
                f"{self.task.value}"
            )


def resolve_pos_weight(config: TrainConfig, train_labels: np.ndarray) -> float:
    """The weight of a positive row in the loss.

    Parameters
    ----------
    config
        The training configuration: ``class_weight = "none"`` gives its ``pos_weight``.
    train_labels
        The guest's labels of its training rows (0/1), for ``class_weight = "balanced"``.

    Returns
    -------
    float
        ``pos_weight``, or ``n_negative / n_positive`` of ``train_labels`` when balanced.

    Raises
    ------
    DataError
        If balanced and the training rows lack one of the two classes.
    """
    if config.class_weight is ClassWeight.NONE:
        return config.pos_weight
    y = np.asarray(train_labels, dtype=np.float64).reshape(-1)
    positives = int(np.count_nonzero(y > 0.5))
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        raise DataError(
            f"class_weight = balanced: the training rows hold {positives} positive and "
            f"{negatives} negative labels; both classes are needed"
        )
    return negatives / positives


def _pos_weight_of(config: TrainConfig, pos_weight: float | None) -> float:
    """``pos_weight`` as passed, else the configured one (balanced needs it passed)."""
    if pos_weight is not None:
        if not (math.isfinite(pos_weight) and pos_weight > 0):
            raise ConfigError(f"pos_weight = {pos_weight}: must be > 0")
        return float(pos_weight)
    if config.class_weight is ClassWeight.BALANCED:
        raise ConfigError(
            "class_weight = balanced: pass pos_weight=resolve_pos_weight(config, train_labels)"
        )
    return config.pos_weight


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The party's optimizer for its own parameters (any ``torch.optim`` class)."""
    cls = getattr(torch.optim, config.optimizer)
    opt: torch.optim.Optimizer = cls(
        params, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    return opt


def joint_init_component(d: int, k: int, *, seed: int | None) -> np.ndarray:
    """One party's Gaussian component of ``W_0`` (§4.3): ``N(0, σ_0²/2)``, ``σ_0² = 2/(d+k)``.

    ``seed`` None draws from the OS CSPRNG (production); a seed is for reproducible runs.
    """
    rng = new_generator() if seed is None else np.random.default_rng(seed)
    return rng.normal(0.0, np.sqrt(1.0 / (d + k)), size=(d, k))


def _marvell_to_json(state: MarvellState) -> dict[str, Any] | None:
    if state.direction is None or state.noise is None:
        return None
    return {"direction": state.direction.tolist(), "noise": asdict(state.noise)}


def _marvell_from_json(obj: dict[str, Any] | None) -> MarvellState:
    if not obj:
        return MarvellState()
    return MarvellState(
        direction=np.array(obj["direction"], dtype=np.float64), noise=MarvellNoise(**obj["noise"])
    )


_SEEDED = threading.Lock()  # seeding + building is atomic when parties share a process


class GuestModels(nn.Module):
    """``f_g``, ``W_g, b`` and the top model (built in a fixed order from ``config.seed``)."""

    bottom: BottomModel
    w_g: nn.Linear
    top: TopModel

    def __init__(self, in_features: int, config: TrainConfig) -> None:
        super().__init__()
        with _SEEDED:
            torch.manual_seed(config.seed)
            self._build(in_features, config)

    def _build(self, in_features: int, config: TrainConfig) -> None:
        self.bottom = BottomModel(
            in_features=in_features,
            widths=config.guest_widths,
            activation=config.activation,
            dropout=config.dropout,
            output_bound=OutputBound.NONE,
        )
        self.w_g = nn.Linear(self.bottom.out_features, config.k)
        self.top = TopModel(
            in_features=config.k,
            widths=config.top_widths,
            activation=config.activation,
            dropout=config.dropout,
        )

    def own_z(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.w_g(self.bottom(x))
        return out


def _host_bottom(in_features: int, config: TrainConfig, seed: int | None) -> BottomModel:
    with _SEEDED:
        torch.manual_seed(secrets.randbits(63) if seed is None else seed)
        return BottomModel(
            in_features=in_features,
            widths=(*config.host_widths[:-1], config.d),
            activation=config.activation,
            dropout=config.dropout,
            bound=config.a_max,
        )


def task_loss(
    task: Task,
    outputs: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: LossKind = LossKind.BCE,
    focal_gamma: float = 2.0,
    pos_weight: float = 1.0,
) -> torch.Tensor:
    """The mean loss of the top model's ``outputs`` (B×1 or B×C) for labels ``y``.

    ``loss``, ``focal_gamma`` and ``pos_weight`` apply to binary tasks
    (:func:`vfl.models.split.binary_loss`); the defaults are plain BCE.
    """
    if task is Task.MULTICLASS:
        out: torch.Tensor = loss_for(task)(outputs, y.long())
        return out
    if task is Task.BINARY:
        return binary_loss(
            outputs.squeeze(1), y, loss=loss, focal_gamma=focal_gamma, pos_weight=pos_weight
        )
    out = loss_for(task)(outputs.squeeze(1), y)
    return out


def guest_backward(
    task: Task,
    models: GuestModels,
    z_h: torch.Tensor,
    z_own: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: LossKind = LossKind.BCE,
    focal_gamma: float = 2.0,
    pos_weight: float = 1.0,
) -> tuple[float, torch.Tensor]:
    """The guest's loss and backward pass for ``z = z_h + z_own``.

    The top model's gradients accumulate as usual; ``W_g, b, f_g`` learn from the true
    ``δ = ∂L/∂z``, which is returned (with the loss) for ``Protect`` and the host's side.
    ``loss``, ``focal_gamma`` and ``pos_weight`` as in :func:`task_loss`.
    """
    z = (z_h + z_own.detach()).requires_grad_(True)
    value = task_loss(
        task, models.top(z), y, loss=loss, focal_gamma=focal_gamma, pos_weight=pos_weight
    )
    torch.autograd.backward(value)  # top model, and δ = ∂L/∂z in z.grad
    delta = z.grad
    if delta is None:
        raise RuntimeError("no gradient w.r.t. the interactive pre-activation")
    torch.autograd.backward(z_own, grad_tensors=delta)
    return float(value.detach()), delta


def task_scores(task: Task, outputs: torch.Tensor) -> np.ndarray:
    """Probabilities (binary: of the positive class; multiclass: B×C) or predicted values."""
    if task is Task.BINARY:
        return torch.sigmoid(outputs.squeeze(1)).double().numpy()
    if task is Task.MULTICLASS:
        return torch.softmax(outputs, dim=1).double().numpy()
    return outputs.squeeze(1).double().numpy()


def protect_labels(task: Task, y: torch.Tensor) -> np.ndarray | None:
    """Labels for ``protect`` (``marvell`` needs them; only binary tasks have such labels)."""
    return y.numpy() if task is Task.BINARY else None


class GuestTrainer:
    """G's models, optimizer and step function around its :class:`GuestLayer`.

    ``pos_weight``: the weight of a positive row in the loss, as :func:`resolve_pos_weight`
    gives it from the training rows' labels; ``None`` takes the configured ``pos_weight``
    (and fails for ``class_weight = "balanced"``, which needs the training labels).
    """

    def __init__(
        self,
        *,
        layer: GuestLayer,
        x: np.ndarray,
        y: np.ndarray,
        config: TrainConfig,
        steps_per_epoch: int = 0,
        rng: np.random.Generator | None = None,
        row_keys: np.ndarray | None = None,
        pos_weight: float | None = None,
    ) -> None:
        self.layer, self.config = layer, config
        self.pos_weight = _pos_weight_of(config, pos_weight)
        self.x = torch.tensor(x, dtype=torch.float32)
        self.y = torch.tensor(y, dtype=torch.float32)
        self.models = GuestModels(x.shape[1], config)
        self.optimizer = make_optimizer(list(self.models.parameters()), config)
        self.rng = new_generator() if rng is None else rng
        # each row's persistent noise is keyed by its line in the guest's file, not by its
        # position in this PSI's order: a rerun with a new PSI draws the same (§4.4.2)
        self.row_keys = row_keys
        self.marvell = MarvellState()
        self.row_noise = RowNoise.draw(self.rng, k=config.k)
        self.losses: list[float] = []
        self.steps_per_epoch = steps_per_epoch  # for protect.max_visits (0: no cap applied)

    def init(self, w0_guest: np.ndarray) -> None:
        """Joint initialisation (the guest's Gaussian component)."""
        self.layer.init(w0_guest)

    def step(self, step: int, rows: np.ndarray) -> None:
        """One training step on ``rows`` (S1-S6 up to, not including, STEP_ACK)."""

        def delta_fn(z_h: np.ndarray) -> np.ndarray:
            self.models.train()
            self.optimizer.zero_grad()
            z_own = self.models.own_z(self.x[rows])
            z_h_t = torch.tensor(z_h, dtype=torch.float32)
            loss, delta = guest_backward(
                self.config.task,
                self.models,
                z_h_t,
                z_own,
                self.y[rows],
                loss=self.config.loss,
                focal_gamma=self.config.focal_gamma,
                pos_weight=self.pos_weight,
            )
            self.optimizer.step()
            self.losses.append(loss)
            protect_config = self.config.protect
            cap = protect_config.max_visits if protect_config.adds_noise else 0
            if cap and self.steps_per_epoch and step // self.steps_per_epoch >= cap:
                return np.zeros(tuple(delta.shape))  # §4.7.1: past the cap, no label signal
            return protect(
                delta.double().numpy(),
                self.config.protect,
                rng=self.rng,
                labels=protect_labels(self.config.task, self.y[rows]),
                state=self.marvell,
                rows=rows if self.row_keys is None else self.row_keys[rows],
                row_noise=self.row_noise,
            )

        self.layer.step(step, rows, delta_fn, self.config.eta_w)

    def scores(self, z_h: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Scores for ``rows`` given their ``z_h`` (:func:`task_scores`)."""
        return guest_scores(self.models, self.config.task, z_h, self.x[rows].numpy())

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
        """(state dicts, big-integer arrays, JSON) for a checkpoint."""
        trees = {
            "models": self.models.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        meta = {
            "protect_rng": self.rng.bit_generator.state,
            "losses": self.losses,
            "marvell": _marvell_to_json(self.marvell),
            "row_noise_seed": format(self.row_noise.seed, "x"),
        }
        return trees, self.layer.state(), meta

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint written from :meth:`state`."""
        self.models.load_state_dict(ckpt.tree("models"))
        self.optimizer.load_state_dict(ckpt.tree("optimizer"))
        torch.set_rng_state(ckpt.tree("torch_rng"))
        self.rng.bit_generator.state = ckpt.meta["protect_rng"]
        self.losses = [float(v) for v in ckpt.meta["losses"]]
        self.marvell = _marvell_from_json(ckpt.meta.get("marvell"))
        seed = ckpt.meta.get("row_noise_seed")  # absent in checkpoints older than §4.7.1
        if seed is not None:
            self.row_noise = RowNoise(seed=int(seed, 16), k=self.config.k)
        self.layer.restore(ckpt.big_ints)


HostObserver = Callable[[int, np.ndarray, np.ndarray, np.ndarray], None]
"""``(step, rows, α, g_h)``: what the host holds after each training step (audits only)."""


class HostTrainer:
    """H's bottom model and optimizer around its :class:`HostLayer`.

    ``seed`` seeds the host's own initialisation; it is the host's choice (None: the OS
    CSPRNG for the embedding noise), never the guest's. ``observer`` is called after each step
    with the batch's rows (from ``BATCH``), the α the host encoded and the ``g_h`` it decoded
    from B1: the host's view for the leakage audit (``benchmarks/leakage.py``).
    """

    def __init__(
        self,
        *,
        layer: HostLayer,
        x: np.ndarray,
        config: TrainConfig,
        seed: int | None = 1,
        observer: HostObserver | None = None,
    ) -> None:
        self.layer, self.config, self.observer = layer, config, observer
        self.x = torch.tensor(x, dtype=torch.float32)
        self.bottom = _host_bottom(x.shape[1], config, seed)
        self.optimizer = make_optimizer(list(self.bottom.parameters()), config)
        # the embedding noise: from the host's seed when it has one (§4.4.2)
        self.rng = new_generator() if seed is None else np.random.default_rng([seed, 2])

    def init(self, w0_host: np.ndarray) -> None:
        """Joint initialisation (the host's Gaussian component)."""
        self.layer.init(w0_host)

    def _alpha(self, rows: np.ndarray) -> torch.Tensor:
        out: torch.Tensor = self.bottom(self.x[torch.as_tensor(rows.astype(np.int64))])
        return out

    def _noisy(self, alpha: torch.Tensor) -> np.ndarray:
        return embedding_noise(
            alpha.detach().double().numpy(),
            sigma=self.config.host_embedding_noise,
            a_max=self.config.a_max,
            rng=self.rng,
        )

    def step(self, step: int, rows: np.ndarray) -> None:
        """One training step on the ``rows`` of the guest's ``BATCH{step}``."""
        kept: dict[str, torch.Tensor] = {}

        def alpha_fn(batch_rows: np.ndarray) -> np.ndarray:
            self.bottom.train()
            self.optimizer.zero_grad()
            kept["alpha"] = self._alpha(batch_rows)
            return self._noisy(kept["alpha"])

        alpha, g_h = self.layer.step(step, rows, alpha_fn)
        if self.observer is not None:
            self.observer(step, rows, alpha, g_h)
        torch.autograd.backward(kept["alpha"], grad_tensors=torch.tensor(g_h, dtype=torch.float32))
        self.optimizer.step()

    def evaluate(self, eval_step: int, rows: np.ndarray) -> None:
        """Answer ``EVAL_BATCH{eval_step}``."""
        self.bottom.eval()
        with torch.no_grad():
            alpha = self._noisy(self._alpha(rows))
        self.layer.evaluate(eval_step, alpha)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
        """(state dicts, big-integer arrays, JSON) for a checkpoint."""
        trees = {
            "bottom": self.bottom.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        return trees, self.layer.state(), {"noise_rng": self.rng.bit_generator.state}

    def restore(self, ckpt: Checkpoint) -> None:
        """Continue from a checkpoint written from :meth:`state`."""
        self.bottom.load_state_dict(ckpt.tree("bottom"))
        self.optimizer.load_state_dict(ckpt.tree("optimizer"))
        torch.set_rng_state(ckpt.tree("torch_rng"))
        self.rng.bit_generator.state = ckpt.meta["noise_rng"]
        self.layer.restore(ckpt.big_ints)


class FloatSplitModel:
    """The split network in float64 in one process (reference S3, quality "plaintext").

    Built from the same seeds as :class:`GuestTrainer` and :class:`HostTrainer` and with
    ``W_0 = W_0^G + W_0^H`` summed in float64; ``W_h`` learns by plain SGD from δ̃. It has no
    epochs: a caller that applies ``protect.max_visits`` sets :attr:`capped` from the cap's
    epoch on (then ``δ̃ = 0``, as :meth:`GuestTrainer.step` sends). ``pos_weight`` as in
    :class:`GuestTrainer`; ``rng`` draws the protection noise (default: the OS CSPRNG).
    """

    def __init__(
        self,
        *,
        x_guest: np.ndarray,
        x_host: np.ndarray,
        y: np.ndarray,
        config: TrainConfig,
        w0_guest: np.ndarray,
        w0_host: np.ndarray,
        host_seed: int = 1,
        pos_weight: float | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.config = config
        self.pos_weight = _pos_weight_of(config, pos_weight)
        self.guest = GuestModels(x_guest.shape[1], config)
        self.host = _host_bottom(x_host.shape[1], config, host_seed)
        self.xg = torch.tensor(x_guest, dtype=torch.float32)
        self.xh = torch.tensor(x_host, dtype=torch.float32)
        self.y = torch.tensor(y, dtype=torch.float32)
        self.w_h = torch.tensor(w0_guest + w0_host, dtype=torch.float64)
        self.opt_g = make_optimizer(list(self.guest.parameters()), config)
        self.opt_h = make_optimizer(list(self.host.parameters()), config)
        self.rng = new_generator() if rng is None else rng
        self.capped = False
        self.marvell = MarvellState()
        self.row_noise = RowNoise.draw(self.rng, k=config.k)
        self.losses: list[float] = []

    def step(self, rows: np.ndarray) -> None:
        """One step on ``rows``, with the protocol's order of updates."""
        self.guest.train()
        self.host.train()
        self.opt_g.zero_grad()
        self.opt_h.zero_grad()
        alpha = self.host(self.xh[rows])
        a = torch.clamp(alpha.detach().double(), -self.config.a_max, self.config.a_max)
        z_h = a @ self.w_h
        z_own = self.guest.own_z(self.xg[rows])
        loss, delta = guest_backward(
            self.config.task,
            self.guest,
            z_h.float(),
            z_own,
            self.y[rows],
            loss=self.config.loss,
            focal_gamma=self.config.focal_gamma,
            pos_weight=self.pos_weight,
        )
        self.opt_g.step()
        self.losses.append(loss)
        if self.capped:  # §4.7.1: past the visit cap, no label signal
            d_t = torch.zeros(tuple(delta.shape), dtype=torch.float64)
        else:
            d_t = torch.tensor(
                protect(
                    delta.double().numpy(),
                    self.config.protect,
                    rng=self.rng,
                    labels=protect_labels(self.config.task, self.y[rows]),
                    state=self.marvell,
                    rows=rows,
                    row_noise=self.row_noise,
                )
            )
        g_h = d_t @ self.w_h.T
        self.w_h = self.w_h - self.config.eta_w * (a.T @ d_t)
        torch.autograd.backward(alpha, grad_tensors=g_h.float())
        self.opt_h.step()

    @torch.no_grad()
    def scores(self, rows: np.ndarray) -> np.ndarray:
        """Scores for ``rows`` (:func:`task_scores`)."""
        self.guest.eval()
        self.host.eval()
        a = torch.clamp(self.host(self.xh[rows]).double(), -self.config.a_max, self.config.a_max)
        z = (a @ self.w_h).float() + self.guest.own_z(self.xg[rows])
        return task_scores(self.config.task, self.guest.top(z))


def guest_models(in_features: int, config: TrainConfig) -> GuestModels:
    """G's bottom, ``W_g, b`` and top model as one module (what a saved model reloads into)."""
    return GuestModels(in_features, config)


def host_bottom(in_features: int, config: TrainConfig) -> nn.Module:
    """H's bottom model (what a saved model reloads into; its weights are then loaded)."""
    return _host_bottom(in_features, config, 0)


@torch.no_grad()
def guest_scores(
    models: GuestModels, task: Task, z_h: np.ndarray, x_guest: np.ndarray
) -> np.ndarray:
    """Scores from ``z_h`` and G's preprocessed features, with reloaded :func:`guest_models`."""
    models.eval()
    z = torch.tensor(z_h, dtype=torch.float32) + models.own_z(
        torch.tensor(x_guest, dtype=torch.float32)
    )
    return task_scores(task, models.top(z))
