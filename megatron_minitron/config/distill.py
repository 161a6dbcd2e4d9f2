"""Knowledge distillation: which losses compare student to teacher, and how they are weighted."""

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_minitron.config.errors import ConfigError

LOGIT_LOSSES = ("forward_kl", "reverse_kl", "jsd", "topk_kl")
HIDDEN_LOSSES = ("none", "cosine", "mse")
BALANCING = ("auto", "fixed")
TEACHER_PRECISIONS = ("auto", "fp32", "bf16")
FUSED_OUTPUT = ("auto", "true", "false")
CACHE_ESTIMATORS = ("auto", "topk", "sampled")


@dataclass
class DistillConfig:
    """Logit distillation (always on) plus optional hidden-state and embedding losses.

    total = kd_weight * logit_loss + ce_weight * student_cross_entropy + sum_i w_i * term_i,
    where the term_i are the hidden-state/embedding losses and w_i come from `balancing`."""

    teacher_checkpoint: Optional[str] = None
    """The teacher: one of our checkpoints (a step folder or a root holding `latest`). Its model
    config describes the teacher; the student comes from checkpoint.load."""
    teacher_cache: Optional[str] = None
    """A folder written by `minitron cache-teacher`: distil from the teacher's cached
    distributions with no teacher in memory (teacher_checkpoint, when also set, must be the
    teacher the cache was built from). Needs the fused output layer and no hidden-state
    losses; the logit loss is the forward KL estimated by teacher_cache_estimator."""
    teacher_cache_estimator: str = "auto"
    """Which cached record the loss reads: "topk" (forward KL over the cached top-k plus the
    tail bucket), "sampled" (the unbiased sampled estimate: -sum_i count_i/k log q(token_i),
    reported minus the teacher's entropy so kd_loss estimates the KL), or "auto" (sampled when
    the cache has samples, else topk)."""
    teacher_precision: str = "auto"
    """Precision of the frozen teacher's forward: "fp32", "bf16", or "auto" (runtime.precision)."""
    logit_loss: str = "forward_kl"
    """Divergence between the teacher's and the student's next-token distributions:
    "forward_kl" KL(teacher || student) (Minitron's choice), "reverse_kl" KL(student || teacher),
    "jsd" generalised Jensen-Shannon (see jsd_beta), or "topk_kl" (forward KL over the
    teacher's top_k tokens plus one bucket holding all other tokens; see top_k)."""
    temperature: float = 1.0
    """Both sets of logits are divided by this before the softmax."""
    scale_by_temperature_squared: bool = False
    """Multiply the logit loss by temperature**2 (Hinton et al.) so its gradients keep their
    size when the temperature changes."""
    jsd_beta: float = 0.5
    """For jsd: mixture m = beta * teacher + (1 - beta) * student and
    loss = beta * KL(teacher || m) + (1 - beta) * KL(student || m); 0.5 is the symmetric JSD.
    Must lie strictly between 0 and 1 (the ends are forward/reverse KL: use those losses)."""
    top_k: int = 64
    """For topk_kl: how many of the teacher's most likely tokens (over the whole vocabulary,
    all TP ranks) are compared one by one; the rest are compared as a single bucket."""
    kd_weight: float = 1.0
    """Weight of the logit distillation loss."""
    ce_weight: float = 0.0
    """Weight of the student's own next-token cross entropy on the labels (Minitron uses 0:
    distillation loss only)."""
    token_chunk_size: Optional[int] = None
    """Tokens per chunk of the logit loss. Peak extra memory is a few chunk x vocab/TP fp32
    buffers plus one student-logits-sized gradient; smaller chunks use less memory. None: as
    many tokens as keep one fp32 chunk within 2 MiB on CPU (temporaries stay in the
    allocator's heap and the cache: 2.7x faster than 1024 tokens at vocabulary 8k, measured)
    or 512 MiB on GPU (distill/losses.py `chunk_rows`)."""
    fused_output: str = "auto"
    """Fuse both models' output layers into the logit loss: "true" computes logits, loss and
    gradients chunk by chunk from the final hidden states, so no [tokens, vocab] logits tensor
    of either model is ever made (distill/fused_output.py); "false" lets each output layer make
    its full logits and chunks only the loss; "auto" is "true" (every layout and loss supports
    it). Same values and gradients either way, to rounding."""
    hidden_loss: str = "none"
    """Loss between paired hidden states: "none", "cosine" (1 - cosine similarity per token)
    or "mse" (mean squared error per token)."""
    layer_pairs: List[List[int]] = field(default_factory=list)
    """[teacher_layer, student_layer] pairs (1-based transformer layer numbers: the output of
    that layer) compared with hidden_loss. A learned linear projection maps the student's
    width to the teacher's when they differ."""
    embedding_loss: bool = False
    """Also compare the embedding outputs (before layer 1) with hidden_loss."""
    balancing: str = "auto"
    """Weights of the hidden/embedding terms: "auto" scales each term to the magnitude of the
    logit term (ratio detached; the Minitron recipe), "fixed" uses hidden_weight and
    embedding_weight."""
    hidden_weight: float = 1.0
    """With balancing=fixed: weight of each hidden-state term."""
    embedding_weight: float = 1.0
    """With balancing=fixed: weight of the embedding term."""

    def __post_init__(self):
        self.fused_output = str(self.fused_output).lower()  # Hydra parses true/false as bools
        choices = (("fused_output", FUSED_OUTPUT), ("logit_loss", LOGIT_LOSSES), ("hidden_loss", HIDDEN_LOSSES),
                   ("balancing", BALANCING), ("teacher_precision", TEACHER_PRECISIONS),
                   ("teacher_cache_estimator", CACHE_ESTIMATORS))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"distill.{name}", f"unknown {getattr(self, name)!r}",
                                  f"use one of {allowed}")
        if self.temperature <= 0:
            raise ConfigError("distill.temperature", f"must be > 0, got {self.temperature}",
                              "use a positive temperature, e.g. 1.0")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ConfigError("distill.jsd_beta", f"must be in (0, 1), got {self.jsd_beta}",
                              "use e.g. 0.5, or logit_loss=forward_kl / reverse_kl for the ends")
        if self.top_k < 1:
            raise ConfigError("distill.top_k", f"must be >= 1, got {self.top_k}",
                              "use a positive number of tokens, e.g. 64")
        if self.token_chunk_size is not None and self.token_chunk_size < 1:
            raise ConfigError("distill.token_chunk_size", "must be >= 1",
                              "use a positive number of tokens, or null for the automatic size")
        for name in ("kd_weight", "ce_weight", "hidden_weight", "embedding_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"distill.{name}", "must be >= 0", "use a non-negative weight")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ConfigError("distill.kd_weight", "kd_weight and ce_weight are both 0",
                              "give the logit loss (or the cross entropy) a positive weight")
        for pair in self.layer_pairs:
            if len(pair) != 2 or min(pair) < 1:
                raise ConfigError("distill.layer_pairs", f"bad pair {pair}",
                                  "give [teacher_layer, student_layer] with 1-based layers")
        students = [p[1] for p in self.layer_pairs]
        if len(set(students)) != len(students):
            raise ConfigError("distill.layer_pairs", f"student layers {students} repeat",
                              "pair each student layer with one teacher layer")
        if self.hidden_loss == "none" and (self.layer_pairs or self.embedding_loss):
            raise ConfigError("distill.hidden_loss", "is none but layer_pairs or "
                              "embedding_loss ask for hidden-state terms",
                              "set hidden_loss=cosine or mse, or drop the pairs")
        if self.teacher_cache:
            self._check_cache_compatible()

    def _check_cache_compatible(self):
        if self.logit_loss != "forward_kl":
            raise ConfigError("distill.teacher_cache", f"a cache estimates the forward KL, not "
                              f"logit_loss={self.logit_loss}", "keep distill.logit_loss="
                              "forward_kl and choose distill.teacher_cache_estimator=topk|"
                              "sampled (the cache's k), or drop teacher_cache to distil online")
        if self.uses_hidden_states:
            raise ConfigError("distill.teacher_cache", "hidden-state losses need the teacher's "
                              "hidden states, which a cache does not hold",
                              "set distill.hidden_loss=none, or drop teacher_cache")
        if self.fused_output == "false":
            raise ConfigError("distill.teacher_cache", "the cached loss is built on the fused "
                              "output layer", "set distill.fused_output=auto")
        if self.teacher_precision != "auto":
            raise ConfigError("distill.teacher_precision", "no teacher runs when distilling "
                              "from distill.teacher_cache: its precision was that of the "
                              "`minitron cache-teacher` run (runtime.precision there)",
                              "keep distill.teacher_precision=auto with a cache")

    @property
    def fuses_output_layer(self) -> bool:
        return self.fused_output in ("auto", "true")

    @property
    def uses_hidden_states(self) -> bool:
        return self.hidden_loss != "none" and bool(self.layer_pairs or self.embedding_loss)
