"""Distillation under pipeline parallelism: what one stage sends to the next.

Teacher and student are split over the same pipeline ranks (same TP/PP layout); stage k holds
teacher layers and student layers of the same stage k. Megatron's 1F1B schedule sends one tensor
per micro-batch between stages; we widen it (through the schedule's `adjust_tensor_shapes_fn`,
no change to megatron) so it carries three things side by side along the last dim:

    [s, b, h_s | h_t | n]   student hidden | teacher hidden (detached) | hidden-loss terms

Each stage splits what it receives, feeds the student part to the student chunk (the schedule's
input tensor, so the student's gradient flows back to the previous stage as usual) and the
teacher part to the teacher chunk (no grad), and packs its own outputs again.

Hidden-state terms of layers on a non-last stage: the term is a scalar computed on that stage,
but its weight (balancing=auto divides by the logit loss, known on the last stage only) and the
loss megatron backpropagates live on the last stage. So each stage writes its terms into the `n`
term columns at position [0, 0] (zeros elsewhere); the next stage reads them back from its input
and passes them on, adding its own. The last stage thus holds every term as a differentiable
function of its input tensor and combines them with the logit loss into the one loss the
schedule backpropagates: backward sends d(loss)/d(term) = weight back through the p2p gradient
to the [0, 0, h_s + h_t + i] entry of the stage that computed term i, and from there into its
projection and student layers. This is exact (no side channel, no second backward) and the
extra traffic is n columns. The terms travel in the student's pipeline dtype (bf16 under
runtime.precision=bf16), as does the teacher's hidden state.

A pair's teacher and student layers must sit on the same stage (`check_pairs_colocated`); the
proportional pairings used after depth pruning (teacher 2l with student l) satisfy this for any
PP that divides both depths.
"""

from typing import Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F

from megatron_minitron.config.errors import ConfigError


def stage_of(layer: int, num_layers: int, pp_size: int) -> int:
    """Pipeline stage holding 1-based `layer` under megatron's even split (0: embedding)."""
    return 0 if layer == 0 else (layer - 1) // (num_layers // pp_size)


def check_pairs_colocated(pairs: Sequence[Tuple[int, int]], teacher_layers: int,
                          student_layers: int, pp_size: int) -> None:
    """Raise ConfigError naming the first [teacher, student] pair split over two stages."""
    for t, s in pairs:
        if t > teacher_layers or s > student_layers:
            raise ConfigError("distill.layer_pairs", f"pair [{t}, {s}] is past the teacher's "
                              f"{teacher_layers} or the student's {student_layers} layers",
                              "use 1-based layer numbers within each model")
        ts, ss = stage_of(t, teacher_layers, pp_size), stage_of(s, student_layers, pp_size)
        if ts != ss:
            raise ConfigError("distill.layer_pairs", f"pair [{t}, {s}]: teacher layer {t} is on "
                              f"pipeline stage {ts}, student layer {s} on stage {ss}",
                              "pair layers of the same stage (e.g. proportional depths) or "
                              "lower parallel.pipeline_model_parallel_size")


class StageChannel:
    """Layout of the widened stage-to-stage tensor `[s, b, h_s + h_t + n]`."""

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int,
                 term_names: List[str]):
        self.h_s, self.h_t, self.names = student_hidden_size, teacher_hidden_size, term_names

    @property
    def width(self) -> int:
        return self.h_s + self.h_t + len(self.names)

    def adjust_tensor_shapes(self, recv_shapes, send_shapes):
        """megatron's adjust_tensor_shapes_fn: (s, b, h_s) -> (s, b, width), both ways."""
        widen = lambda shapes: [(s[0], s[1], self.width) for s in shapes]  # noqa: E731
        return widen(recv_shapes), widen(send_shapes)

    def split(self, received: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """[s, b, width] -> student [s, b, h_s] (keeps the graph), teacher [s, b, h_t]
        (detached), {term name: scalar carried from earlier stages}."""
        student = received[..., :self.h_s].contiguous()
        teacher = received[..., self.h_s:self.h_s + self.h_t].detach().contiguous()
        terms = received[0, 0, self.h_s + self.h_t:]
        return student, teacher, {n: terms[i] for i, n in enumerate(self.names)}

    def pack(self, student: torch.Tensor, teacher: torch.Tensor,
             carried: Mapping[str, torch.Tensor], terms: Mapping[str, torch.Tensor]
             ) -> torch.Tensor:
        """student [s, b, h_s], teacher [s, b, h_t] -> [s, b, width] in the student's dtype;
        each term (carried from earlier stages or computed here) at [0, 0, h_s + h_t + i]."""
        s, b, _ = student.shape
        parts = [student, teacher.detach().to(student.dtype)]
        if self.names:
            zero = student.new_zeros((), dtype=torch.float32)
            values = torch.stack([carried.get(n, zero).float() + terms.get(n, zero).float()
                                  for n in self.names])
            # [n] -> [1, 1, n] -> [s, b, n], zeros but at [0, 0]
            parts.append(F.pad(values.view(1, 1, -1), (0, 0, 0, b - 1, 0, s - 1))
                         .to(student.dtype))
        return torch.cat(parts, dim=-1)
