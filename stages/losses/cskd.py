"""CSKD: cosine-similarity-guided KD (Park et al., "Cosine Similarity-guided Knowledge
Distillation for Robust Object Detectors"; official code github swkdn16/CSKD,
`mmdet/models/dense_heads/cskd_head_{retina,fcos,gfl}.py`, `configs/cskd/*`).

The core term (official `_loss_mse_cos`) on a student map s and teacher map t [B, C, H, W]:
  cos_ch[b, c]  cosine over the cells between s[b, c] and t[b, c]         (eps 1e-6)
  cos_sp[b, y, x] cosine over channels between s[b, :, y, x], t[b, :, y, x]
  G = |(1 - cos_ch) (1 - cos_sp)|   guidance (not detached, as official)
  plain   (no avg factor): w_mse * mean(G (s-t)^2) + w_cos * (mean_bc(1-cos_ch) + mean_cells(1-cos_sp))
  avg F   (avg factor F):  w_mse * sum(G (s-t)^2) / F + w_cos * (mean_bc(1-cos_ch) + sum_cells(1-cos_sp) / F)
  masked  (fg / bg, mask M, F = sum(M) * C_s, C_s below): s, t and G multiplied by M first; cells outside M are zero
          vectors, so each adds a constant 1 to sum_cells(1 - cos_sp) (as official)
"Cells" are the batch's valid cells (padding never counts: the project's rule; the official code
runs over the padded map). Weights (w_mse, w_cos) = (1, 0.5) for every part (official configs).

| official term (loss key)       | here (part)  | input                               | form / normaliser            |
|--------------------------------|--------------|-------------------------------------|------------------------------|
| DistillNeck loss_feat (neck)   | neck         | mimic_conv[l](S_l) vs T_l           | plain                        |
| DistillNeck loss_rois (nkroi)  | roi          | 7x7 RoIAlign of both at GT boxes    | plain over R x C x 49        |
| DistillNeck loss_fg / loss_bg  | fg / bg      | both x GT-box mask / x its complement | masked, F = sum(M) * C_s   |
| Distillprediction cls (kdcls)  | pred_cls     | sigmoid maps                        | plain (GFL: avg, F = fg*C)   |
| Distillprediction bbox (kdbbox)| pred_box     | raw box maps                        | avg, F = sum(fg) * C_box     |
| Distillprediction cnt (FCOS)   | pred_ctr     | sigmoid centerness                  | avg, F = sum(fg) * 1         |
| loss_assis_* (assistant)       | assist_*     | see `cskd_assistant`                | / number of positives        |
| Distillbranch (brcls / brreg)  | tower_cls / tower_reg | each tower layer's output (after its activation), student vs teacher | plain; sum over levels, mean over layers |
C_s in the fg / bg normaliser is the STUDENT's FPN width, not the adapted (teacher) width the terms run
at: the official `DistillNeck.forward` reads `b, c, h, w = student.shape` before `mimic_conv`. With equal
widths (the official configs) both agree; a student narrower than its teacher gets teacher/student times
the adapted-width value.
Every part is SUMMED over the FPN levels (mmdet sums the per-level loss lists); the caller's weight
multiplies all parts. mimic_conv: one 1x1 conv per level, always (even 256 -> 256), N(0, 0.01) init
as the official head's init_cfg. Tower terms: the teacher's tower maps are not cached (huge); the
frozen teacher head (`teacher.head`, from the cache's static weights or the live teacher) runs on
the teacher's FPN maps instead (cells outside an image read zeros there, the live teacher read its
padding: only terms near the border can differ). As official, RetinaNet / GFL compare the student's
tower maps directly (their branch mimic convs are built but unused in the official code), FCOS
through one 1x1 conv per level and layer (use_conv_for_mimic); a student whose tower width differs
from the teacher's gets those convs for every arch. Layers pair up to the shallower tower.
`tower=False` leaves the tower terms out (and the need for the teacher head).

GT boxes -> cells: official `int(x / img_w * W)` (truncation, x2 inclusive). By default the factor is
1/stride; `official_box_scaling=True` uses W / (unpadded image width) as the official code, which
stretches boxes on padded images (a bug kept as an option). Guards the official code lacks: a level
without fg cells gives fg 0 (official: 0/0), a batch without GT gives roi 0.
Prediction parts need dense student and teacher; pred_box / pred_ctr / assist_* need the same
architecture (same anchors and box format) and are left out otherwise; pred_cls compares the
per-location max over anchors when anchors per location differ (an extension).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from stages.detectors.contract import DetectorOutput
from stages.losses.common import check_levels, match_class_maps, valid_masks, wide
from stages.losses.cskd_assistant import AssistantHead, assistant_losses
from stages.losses.targets import TeacherTargets

ROI_SIZE = 7
COS_EPS = 1e-6


def guided_term(s: Tensor, t: Tensor, valid: Tensor, w_mse: float, w_cos: float,
                select: Tensor | None = None, avg_factor: Tensor | float | None = None) -> Tensor:
    """The official `_loss_mse_cos` on s, t [B, C, H, W] over the cells where valid [B, 1, H, W] > 0.

    select [B, 1, H, W] 0/1: the masked form (fg / bg); avg_factor: the normaliser F (None = means).
    """
    t = t.detach()
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    keep = valid > 0
    if select is not None:
        keep_sel = keep & (select > 0)
        s, t = torch.where(keep_sel, s, zero), torch.where(keep_sel, t, zero)
    else:
        s, t = torch.where(keep, s, zero), torch.where(keep, t, zero)
    c = s.shape[1]
    cos_ch = F.cosine_similarity(s.flatten(2), t.flatten(2), dim=2, eps=COS_EPS)  # [B, C]
    cos_sp = F.cosine_similarity(s, t, dim=1, eps=COS_EPS)[:, None]  # [B, 1, H, W]
    guidance = ((1 - cos_ch)[:, :, None, None] * (1 - cos_sp)).abs()
    if select is not None:
        guidance = guidance * select
    sq = torch.where(keep, guidance * (s - t) ** 2, zero).sum()
    sp = torch.where(keep, 1 - cos_sp, zero).sum()
    n_cells = keep.sum().clamp_min(1)
    if avg_factor is None:
        mse, sp_term = sq / (n_cells * c), sp / n_cells
    else:
        mse, sp_term = sq / avg_factor, sp / avg_factor
    return w_mse * mse + w_cos * ((1 - cos_ch).mean() + sp_term)


def box_cells(boxes: list[Tensor], image_sizes, shapes, strides, official: bool, device) -> list[Tensor]:
    """Per level a 0/1 map [B, 1, H, W] of the cells GT boxes cover (official rounding)."""
    out = []
    for (h, w), stride in zip(shapes, strides):
        m = torch.zeros(len(boxes), 1, h, w, device=device)
        for b, bx in enumerate(boxes):
            fx, fy = _factors(image_sizes[b], (h, w), stride, official)
            for x1, y1, x2, y2 in bx.tolist():
                m[b, 0, int(y1 * fy): int(y2 * fy) + 1, int(x1 * fx): int(x2 * fx) + 1] = 1
        out.append(m)
    return out


def _factors(image_size, shape, stride, official: bool) -> tuple[float, float]:
    if official:  # official: x / img_shape[1] * W, with W the padded map width
        return shape[1] / image_size[1], shape[0] / image_size[0]
    return 1.0 / stride, 1.0 / stride


class CSKDLoss(nn.Module):
    name = "cskd"

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        w_mse: float = 1.0,
        w_cos: float = 0.5,
        predictions: bool = True,
        assistant: bool = True,
        num_levels: int = 5,
        arch: str = "",
        same_arch: bool = False,
        head_channels: int = 0,
        num_anchors: int = 1,
        box_dim: int = 4,
        reg_max: int = 0,
        official_box_scaling: bool = False,
        assign=None,
        tower: bool = True,
        tower_layers: int = 0,
        teacher_head_channels: int = 0,
    ):
        """predictions: student and teacher are dense. same_arch: teacher has the student's
        architecture and box format (pred_box / pred_ctr / assistant apply). assign: the student's
        assigner, (DetectorOutput, targets) -> per image [N] matched GT index (-1 bg, -2 ignored)."""
        super().__init__()
        self.mimic = nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, 1) for _ in range(num_levels))
        for conv in self.mimic:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.num_classes = num_classes
        self.w_mse, self.w_cos = w_mse, w_cos
        self.predictions = predictions
        self.same_arch = predictions and same_arch
        self.arch, self.reg_max = arch, reg_max
        self.official_box_scaling = official_box_scaling
        self.assign = assign
        self.tower = self.same_arch and tower and tower_layers > 0
        self.tower_mimic = None
        t_width = teacher_head_channels or teacher_channels
        h_width = head_channels or student_channels
        if self.tower and (arch == "fcos" or h_width != t_width):
            self.tower_mimic = nn.ModuleDict({
                branch: nn.ModuleList(nn.Conv2d(h_width, t_width, 1) for _ in range(num_levels * tower_layers))
                for branch in ("cls", "reg")
            })
            for convs in self.tower_mimic.values():
                for conv in convs:
                    nn.init.normal_(conv.weight, std=0.01)
                    nn.init.zeros_(conv.bias)
        self.assistant = None
        if self.same_arch and assistant:
            if assign is None:
                raise ValueError("cskd assistant needs the student's assigner (LossContext.assign)")
            self.assistant = AssistantHead(arch, head_channels or student_channels, num_anchors, num_classes,
                                           box_dim, num_levels)

    def needs(self) -> set[str]:
        need = {"fpn"}
        if self.predictions:
            need.add("cls")
        if self.same_arch:
            need.add("box")
            if self.arch == "fcos":
                need.add("quality")
        if self.tower:
            need.add("head")
        return need

    def term(self, s: Tensor, t: Tensor, valid: Tensor, select=None, avg_factor=None) -> Tensor:
        return guided_term(s, t, valid, self.w_mse, self.w_cos, select, avg_factor)

    def forward(self, student: DetectorOutput, teacher: TeacherTargets, targets: list[dict]) -> dict[str, Tensor]:
        check_levels(self.name, student.fpn, teacher.fpn)
        if len(self.mimic) != len(student.fpn):
            raise ValueError(f"cskd: built for {len(self.mimic)} levels, student has {len(student.fpn)}")
        device = student.fpn[0].device
        shapes = [tuple(f.shape[-2:]) for f in student.fpn]
        valid = valid_masks(student.image_sizes, shapes, student.strides, device)
        gt_boxes = [t["boxes"].to(device=device, dtype=torch.float32).reshape(-1, 4) for t in targets]
        fg = [m * v for m, v in zip(box_cells(gt_boxes, student.image_sizes, shapes, student.strides,
                                              self.official_box_scaling, device), valid)]
        parts: dict[str, Tensor] = {}

        def add(key: str, value: Tensor) -> None:
            parts[key] = parts[key] + value if key in parts else value

        for lv, (s_map, t_map, stride, v, f) in enumerate(zip(student.fpn, teacher.fpn, student.strides, valid, fg)):
            c = s_map.shape[1]  # official DistillNeck.forward: b, c, h, w read BEFORE mimic_conv (student width)
            s, t = self.mimic[lv](wide(s_map)), wide(t_map).detach()
            add("neck", self.term(s, t, v))
            add("roi", self._roi_term(s, t, v, gt_boxes, student.image_sizes, stride))
            add("fg", self.term(s, t, v, f, f.sum() * c) if f.sum() > 0 else s.new_zeros(()))
            bg = v - f
            add("bg", self.term(s, t, v, bg, bg.sum() * c) if bg.sum() > 0 else s.new_zeros(()))
        if self.predictions:
            self._prediction_terms(student, teacher, valid, fg, add)
        if self.tower:
            parts.update(self._tower_terms(student, teacher, valid))
        if self.assistant is not None:
            matched = self.assign(student, targets)
            parts.update(assistant_losses(self.assistant, student, teacher, targets, matched, valid, fg,
                                          self.num_classes, self.reg_max))
        return parts

    def _roi_term(self, s, t, v, gt_boxes, image_sizes, stride) -> Tensor:
        if sum(len(b) for b in gt_boxes) == 0:
            return s.new_zeros(())
        shape = tuple(s.shape[-2:])
        rois = []
        for b, bx in enumerate(gt_boxes):
            fx, fy = _factors(image_sizes[b], shape, stride, self.official_box_scaling)
            rois.append((bx * bx.new_tensor([fx, fy, fx, fy])).to(s.dtype))
        # zero padding first: bilinear samples at an image's border must not read it
        s_roi, t_roi = (roi_align(torch.where(v > 0, x, 0.0), rois, ROI_SIZE, 1.0, 2, aligned=True) for x in (s, t))
        return self.term(s_roi, t_roi, torch.ones_like(s_roi[:, :1]))

    def _prediction_terms(self, student, teacher, valid, fg, add) -> None:
        check_levels(self.name, student.cls_logits, teacher.cls_probs)
        cls_avg = self.arch == "gfl" and self.same_arch  # official GFL: avg_factor=True for cls
        for lv, (v, f) in enumerate(zip(valid, fg)):
            sp, tp = match_class_maps(wide(student.cls_logits[lv]).sigmoid(), wide(teacher.cls_probs[lv]),
                                      self.num_classes)
            add("pred_cls", self.term(sp, tp, v, None, (f.sum() * sp.shape[1]).clamp_min(1) if cls_avg else None))
            if not self.same_arch:
                continue
            s_box, t_box = wide(student.box_reg[lv]), wide(teacher.box_reg[lv])
            add("pred_box", self.term(s_box, t_box, v, None, (f.sum() * s_box.shape[1]).clamp_min(1)))
            if self.arch == "fcos" and student.quality and teacher.quality:
                s_q, t_q = wide(student.quality[lv]).sigmoid(), wide(teacher.quality[lv])
                add("pred_ctr", self.term(s_q, t_q, v, None, (f.sum() * s_q.shape[1]).clamp_min(1)))

    def _tower_terms(self, student, teacher, valid) -> dict[str, Tensor]:
        """Official Distillbranch: per tower layer, the plain term summed over levels; mean over layers."""
        if teacher.head is None:
            raise ValueError("cskd tower terms need the teacher's dense head (TeacherTargets.head)")
        with torch.no_grad():
            t_out = teacher.head([wide(m) for m in teacher.fpn])
        out = {}
        for branch, s_tower, t_tower in (("cls", student.cls_tower, t_out.cls_tower),
                                         ("reg", student.reg_tower, t_out.reg_tower)):
            layers = min(len(s_tower.post), len(t_tower.post))
            total = 0.0
            for i in range(layers):
                for lv, (s_map, t_map, v) in enumerate(zip(s_tower.post[i], t_tower.post[i], valid)):
                    s_map = wide(s_map)
                    if self.tower_mimic is not None:
                        s_map = self.tower_mimic[branch][i * len(valid) + lv](s_map)
                    total = total + self.term(s_map, wide(t_map), v)
            out[f"tower_{branch}"] = total / max(layers, 1)
        return out
