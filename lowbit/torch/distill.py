"""Knowledge distillation from the float teacher during QAT (Hinton et al., 2015).

The quantized student learns the teacher's full output distribution, softened by a
temperature, which carries more information per sample than the hard label and is what lets a
low-bit student recover most of the teacher's accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.errors import LowbitError


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0,
                      labels: torch.Tensor | None = None, alpha: float = 0.5) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, times T^2 (so gradients keep
    their size as T changes). With `labels`: alpha * that + (1 - alpha) * cross-entropy.

    The teacher is detached: only the student learns."""
    if temperature <= 0:
        raise LowbitError(f"distillation temperature must be positive, got {temperature}; use e.g. 4.0")
    if student_logits.shape != teacher_logits.shape:
        raise LowbitError(f"student logits {list(student_logits.shape)} and teacher logits "
                          f"{list(teacher_logits.shape)} differ in shape; distill from a teacher with the same outputs")
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"alpha must be in [0, 1], got {alpha}")
    teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    student = F.log_softmax(student_logits / temperature, dim=-1)
    soft = F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2
    if labels is None:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def distill_finetune(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                     epochs: int, seed: int = 0, lr: float = 2e-3, batch_size: int = 64,
                     temperature: float = 4.0, alpha: float = 0.5, desc: str | None = None) -> None:
    """The one-line QAT loop: AdamW with a cosine schedule on `distillation_loss` from the float
    teacher plus the labels, shuffled with `seed`. Leaves the student in eval mode.

    Any user loop works with lowbit's prepared models; this is the default for the common case."""
    from lowbit.progress import progress

    if epochs < 1:
        raise LowbitError(f"epochs must be at least 1, got {epochs}")
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    teacher.eval()
    student.train()
    with progress(total=epochs * steps_per_epoch, desc=desc or "QAT", unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                with torch.no_grad():
                    teacher_logits = teacher(x[batch])
                loss = distillation_loss(student(x[batch]), teacher_logits, temperature, y[batch], alpha)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
    student.eval()
