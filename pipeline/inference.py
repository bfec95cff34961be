"""Inference, the one place for it: heatmaps from crops (modules fused, the flip test), decoded to
keypoints, crops of photographs and their way back to original pixels, the coarse-to-fine box rule for
photos without a box, and the device. Training's evaluations, `mshg evaluate` and `mshg predict` all
predict through these functions; no DALI here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from pipeline.distributed import pick_device
from pipeline.inputs import crop_matrix, to_model_input

def decode_heatmaps(heatmaps: torch.Tensor, stride: int, dark_kernel: int = 0) -> torch.Tensor:
    """(B, J, H, W) -> (B, J, 3): x, y in continuous input-crop coordinates, and the peak score.

    Argmax, then a sub-pixel refinement: with `dark_kernel` 0, a quarter-pixel shift towards the
    higher neighbour (Newell et al.); else DARK (Zhang et al. 2020, as mmpose's refine_keypoints_dark):
    the map blurred by a Gaussian of that odd kernel size, its log's Newton step from the argmax."""
    b, j, h, w = heatmaps.shape
    flat = heatmaps.float().reshape(b, j, -1)
    score, index = flat.max(-1)
    x = (index % w).float()
    y = torch.div(index, w, rounding_mode="floor").float()
    offset = dark_offset(heatmaps.float(), x.long(), y.long(), dark_kernel) if dark_kernel else \
        quarter_offset(heatmaps.float(), x.long(), y.long())
    x = (x + offset[..., 0] + 0.5) * stride
    y = (y + offset[..., 1] + 0.5) * stride
    return torch.stack([x, y, score], -1)


def _at(hm: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor):
    """A function (dx, dy) -> hm at the (B, J) cells (xi + dx, yi + dy), clamped to the map."""
    b, j, h, w = hm.shape
    bi = torch.arange(b, device=hm.device)[:, None].expand(b, j)
    ji = torch.arange(j, device=hm.device)[None, :].expand(b, j)
    return lambda dx, dy: hm[bi, ji, (yi + dy).clamp(0, h - 1), (xi + dx).clamp(0, w - 1)]


def quarter_offset(hm: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
    """(B, J, 2): +-0.25 towards the higher neighbour along x and y; 0 at the border."""
    h, w = hm.shape[-2:]
    at = _at(hm, xi, yi)
    dx = torch.where((xi > 0) & (xi < w - 1), torch.sign(at(1, 0) - at(-1, 0)), 0.0)
    dy = torch.where((yi > 0) & (yi < h - 1), torch.sign(at(0, 1) - at(0, -1)), 0.0)
    return 0.25 * torch.stack([dx, dy], -1)


def dark_offset(hm: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor, kernel: int) -> torch.Tensor:
    """(B, J, 2): DARK's offset -H^-1 g of the log of the blurred map at the argmax, where the argmax
    is 2+ cells from the border and the Hessian is invertible (else the quarter offset). The blur
    (zero padding, sigma as OpenCV's default for the kernel size) is rescaled to the map's own peak,
    and the step is clipped to one cell: a maximum's refinement stays within its cell's neighbours."""
    b, j, h, w = hm.shape
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    r = torch.arange(kernel, dtype=torch.float32, device=hm.device) - (kernel - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    flat = hm.reshape(b * j, 1, h, w)
    blurred = F.conv2d(F.conv2d(flat, g.view(1, 1, 1, -1), padding=(0, kernel // 2)), g.view(1, 1, -1, 1),
                       padding=(kernel // 2, 0)).reshape(b, j, h, w)
    peak = hm.amax((2, 3), keepdim=True)
    blurred = blurred * peak / blurred.amax((2, 3), keepdim=True).clamp_min(1e-10)
    at = _at(blurred.clamp_min(1e-10).log(), xi, yi)
    dx, dy = 0.5 * (at(1, 0) - at(-1, 0)), 0.5 * (at(0, 1) - at(0, -1))
    dxx = 0.25 * (at(2, 0) - 2 * at(0, 0) + at(-2, 0))
    dyy = 0.25 * (at(0, 2) - 2 * at(0, 0) + at(0, -2))
    dxy = 0.25 * (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1))
    det = dxx * dyy - dxy ** 2
    inner = (xi > 1) & (xi < w - 2) & (yi > 1) & (yi < h - 2) & (det.abs() > 1e-12)
    safe = torch.where(inner, det, torch.ones_like(det))
    step = torch.stack([-(dyy * dx - dxy * dy) / safe, -(dxx * dy - dxy * dx) / safe], -1).clamp(-1, 1)
    return torch.where(inner[..., None], step, quarter_offset(hm, xi, yi))


def crop_to_original(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Continuous crop coordinates (B, J, 2) -> 0-based pixel coordinates of the original image,
    through the inverse of the 2x3 crop matrix (B, 2, 3) that made the crop."""
    full = torch.cat([matrix.double(), torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64,
                                                    device=matrix.device).expand(len(matrix), 1, 3)], 1)
    inv = torch.linalg.inv(full)[:, :2]
    xy = points.double() @ inv[:, :, :2].transpose(1, 2) + inv[:, None, :, 2]
    return (xy - 0.5).float()


def fuse_heatmaps(outputs: list[torch.Tensor], strides: list[int], modules: list[int]) -> tuple[torch.Tensor, int]:
    """The heatmaps predictions are decoded from: the mean of the listed modules' (1-based; empty: the
    last module), each resized bilinearly to the finest stride among them. -> (heatmaps, stride).
    Cell k has its centre at (k + 0.5) * stride at every stride, and bilinear resizing with
    align_corners=False keeps centres on centres, so the maps line up."""
    chosen = [m - 1 for m in modules] or [len(outputs) - 1]
    stride = min(strides[i] for i in chosen)
    size = outputs[chosen[0]].shape[-1] * strides[chosen[0]] // stride
    maps = [outputs[i].float() if strides[i] == stride else
            F.interpolate(outputs[i].float(), size=(size, size), mode="bilinear", align_corners=False)
            for i in chosen]
    return torch.stack(maps).mean(0), stride


def zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """(B, C, H, W) -> the same size, sampled at `factor` times each point's distance from the centre
    (bilinear, zeros outside): factor < 1 enlarges the middle, > 1 shrinks the whole into the middle."""
    theta = torch.tensor([[factor, 0.0, 0.0], [0.0, factor, 0.0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", align_corners=False)


@torch.no_grad()
def crop_heatmaps(model: torch.nn.Module, images: torch.Tensor, flip_perm: list[int] | None = None,
                  modules: list[int] = (), scales: list[float] = (1.0,)) -> tuple[torch.Tensor, int]:
    """uint8 crops (B, S, S, 3) -> (heatmaps (B, J, H, W) in float32, their stride), in fp32.

    With `flip_perm` (the dataset's left/right permutation), the flip test: the mirrored crops go
    through the model too, their heatmaps are mirrored back, left and right joints swapped, and the
    two are averaged. Mirroring pixel i to S-1-i maps continuous x to S - x, and heatmap cell k
    (centre (k + 0.5) * stride) to cell W-1-k, so the two heatmaps line up without a shift.

    Each of `scales` (the multi-scale test) zooms the crop about its centre (black outside, as a crop
    past the photo's border is), and its heatmaps are zoomed back by the inverse factor onto the crop's
    own frame before the average."""
    total = 0.0
    for factor in scales:
        zoomed = images if factor == 1 else \
            zoom(images.permute(0, 3, 1, 2).float(), factor).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        x = to_model_input(zoomed)
        heatmaps, stride = fuse_heatmaps(model(x), model.strides, list(modules))
        if flip_perm is not None:
            flipped, _ = fuse_heatmaps(model(torch.flip(x, dims=[3])), model.strides, list(modules))
            flipped = torch.flip(flipped, dims=[3])[:, list(flip_perm)]
            heatmaps = (heatmaps + flipped) * 0.5
        total = total + (heatmaps if factor == 1 else zoom(heatmaps, 1 / factor))
    return total / len(scales), stride


def predict_crops(model: torch.nn.Module, images: torch.Tensor, flip_perm: list[int] | None = None,
                  modules: list[int] = (), dark_kernel: int = 0, scales: list[float] = (1.0,)) -> torch.Tensor:
    """uint8 crops (B, S, S, 3) -> keypoints (B, J, 3) in crop coordinates: x, y and the peak score."""
    return decode_heatmaps(*crop_heatmaps(model, images, flip_perm, modules, scales), dark_kernel=dark_kernel)


BOX_SCORE = 0.1  # joints of a pass whose peak is at least this share of the best one frame the next
# a pass with fewer confident joints found no person to frame: its crop stays as it was (1: always reframe)
MIN_BOX_JOINTS = 1
MIN_BOX_SIDE = 4.0  # pixels: the confident joints of a pass that span less (one joint) frame nothing


@dataclass(frozen=True)
class PhotoSearch:
    """How a photo without a box is searched, coarse to fine. The first pass tries the whole photo and a 3x3
    grid of square windows per share in `windows` of its longer side (a person small in the whole photo is
    found larger in a window); the `keep` crops whose joints the model is surest of (the highest mean peak)
    are each refined (passes - 1) times: every later pass crops the confident joints' box grown by `grows`
    (pass 2 the first factor, later passes the last: x1.4 after the coarse first pass, which misses
    extremities, x1.0 once a framed crop found them). The answer is the refined crop the model is surest of.
    Zooms (`first_scales`, `scales`; None: the run's eval.scales) and the flip test (`first_flip`, `flip`; none
    with --no-flip) each multiply that pass's cost. What each costs and gives:
    bench/predict_speed.py, docs/results/predict_speed.md."""
    windows: tuple[float, ...] = ()
    keep: int = 1
    passes: int = 3
    grows: tuple[float, ...] = (1.4, 1.0)
    first_scales: tuple[float, ...] | None = (1.0,)
    first_flip: bool = False
    scales: tuple[float, ...] | None = (1.0,)
    flip: bool = True  # the refinement passes' flip test (with a flip permutation: not --no-flip)

    def with_passes(self, passes: int | None) -> "PhotoSearch":
        return self if passes is None else dataclasses.replace(self, passes=passes)


# `mshg predict`'s default for a photo without a box: the whole photo at one scale, refined twice with the flip test
FAST = PhotoSearch()
# --accurate: windows of 0.6 of the photo too (a person small in the photo), the 3 surest crops refined, every pass
# at the run's full test
ACCURATE = PhotoSearch(windows=(0.6,), keep=3, first_scales=None, first_flip=True, scales=None)


def read_image(path: str) -> np.ndarray:
    """An image file -> RGB uint8, as a viewer shows it: EXIF orientation applied, grayscale and CMYK to RGB,
    transparency laid over white, 16-bit and float images scaled to 8 bits."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read or decode this image ({e})") from None


def to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit or float grayscale: its own range to 0-255
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, -1)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def image_from_bytes(data: bytes, name: str) -> np.ndarray:
    """Encoded image bytes (a shard's jpg member) -> RGB; `name` says where they came from in the error."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{name}: cannot decode this image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def usable_box(box) -> bool:
    """A box (x0, y0, w, h) that frames something: finite, with a side of at least MIN_BOX_SIDE pixels."""
    return box is not None and len(box) == 4 and all(math.isfinite(float(v)) for v in box) \
        and max(float(box[2]), float(box[3])) >= MIN_BOX_SIDE


def crop(image: np.ndarray, box, input_size: int, padding: float) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 crop SxSx3, the 2x3 continuous-coordinate matrix that made it)."""
    if not usable_box(box):
        raise ValueError(f"box {box}: needs a width or height of at least {MIN_BOX_SIDE:g} pixels")
    m = crop_matrix(np.asarray(box, np.float64), input_size, padding)
    # OpenCV samples at integer pixel centres; shift the continuous-coordinate matrix by half a pixel
    m_index = m.astype(np.float64).copy()
    m_index[:, 2] += m_index[:, :2].sum(1) * 0.5 - 0.5
    out = cv2.warpAffine(image, m_index, (input_size, input_size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out, m


def box_from_keypoints(keypoints: np.ndarray, grow: float = 1.0) -> list[float] | None:
    """The box (x0, y0, w, h, as the shards store it) of a pass's confident joints (J, 3), grown by `grow` about
    its centre; None when fewer than MIN_BOX_JOINTS are confident or they span less than MIN_BOX_SIDE pixels."""
    confident = keypoints[keypoints[:, 2] >= BOX_SCORE * max(keypoints[:, 2].max(), 1e-6)]
    if len(confident) < MIN_BOX_JOINTS:
        return None
    x0, y0 = confident[:, :2].min(0)
    x1, y1 = confident[:, :2].max(0)
    w, h = (x1 - x0) * grow, (y1 - y0) * grow
    box = [float((x0 + x1 - w) / 2), float((y0 + y1 - h) / 2), float(w), float(h)]
    return box if usable_box(box) else None


def photo_heatmaps(model, cfg, images: list[np.ndarray], boxes: list, flip_perm: list[int] | None,
                   scales=None) -> tuple[torch.Tensor, int, torch.Tensor]:
    """RGB images and their boxes -> (heatmaps (N, J, H, W) of their crops, the heatmaps' stride, the (N, 2, 3)
    matrices that made the crops), decoded from the run's eval.modules, at `scales` (None: eval.scales)."""
    size, padding = cfg.data.input_size, cfg.data.padding
    crops, matrices = zip(*(crop(image, box, size, padding) for image, box in zip(images, boxes)))
    device = next(model.parameters()).device
    heatmaps, stride = crop_heatmaps(model, torch.from_numpy(np.stack(crops)).to(device), flip_perm,
                                     cfg.eval.modules, cfg.eval.scales if scales is None else scales)
    return heatmaps.cpu(), stride, torch.from_numpy(np.stack(matrices))


def predict_batch(model, cfg, images: list[np.ndarray], boxes: list, flip_perm: list[int] | None,
                  scales=None) -> np.ndarray:
    """RGB images and their boxes -> keypoints (N, J, 3) in original pixels (x, y, peak score)."""
    heatmaps, stride, matrices = photo_heatmaps(model, cfg, images, boxes, flip_perm, scales)
    keypoints = decode_heatmaps(heatmaps, stride, dark_kernel=cfg.eval.dark_kernel)
    xy = crop_to_original(keypoints[..., :2], matrices)
    return torch.cat([xy, keypoints[..., 2:]], -1).numpy()


def first_pass_boxes(image: np.ndarray, windows: tuple[float, ...] = FAST.windows) -> list[list[float]]:
    """The whole photo, then a 3x3 grid of square windows per share of its longer side (x0, y0, w, h)."""
    h, w = image.shape[:2]
    boxes = [[0.0, 0.0, float(w), float(h)]]
    for share in windows:
        side = share * max(h, w)
        # corner to corner; a window longer than the photo's short side is centred on it that way
        for cy in np.linspace(min(side, h) / 2, max(h - side / 2, h / 2), 3):
            for cx in np.linspace(min(side, w) / 2, max(w - side / 2, w / 2), 3):
                boxes.append([float(cx - side / 2), float(cy - side / 2), side, side])
    return boxes


def predict_images(model, cfg, images: list[np.ndarray], boxes: list, flip_perm: list[int] | None,
                   search: PhotoSearch = FAST) -> np.ndarray:
    """Keypoints (N, J, 3) in original pixels. An image with a box: its crop at the run's full test (eval.scales,
    the flip test with `flip_perm`). One without (None): searched as `search` says (PhotoSearch)."""
    keypoints = [None] * len(images)
    given = [(i, b) for i, b in enumerate(boxes) if b is not None]
    if given:
        for (i, _), kp in zip(given, predict_batch(model, cfg, [images[i] for i, _ in given],
                                                   [b for _, b in given], flip_perm)):
            keypoints[i] = kp
    first = [(i, box) for i, b in enumerate(boxes) if b is None for box in first_pass_boxes(images[i], search.windows)]
    if not first:
        return np.stack(keypoints)
    found = predict_batch(model, cfg, [images[i] for i, _ in first], [box for _, box in first],
                          flip_perm if search.first_flip else None, search.first_scales)
    crops = {}  # bare photo -> its first-pass keypoints, one per crop
    for (i, _), kp in zip(first, found):
        crops.setdefault(i, []).append(kp)
    kept = [(i, kp) for i, kps in crops.items()  # (photo, keypoints) of its surest crops
            for kp in sorted(kps, key=lambda kp: -kp[:, 2].mean())[:search.keep]]
    for k in range(search.passes - 1):
        grow = search.grows[min(k, len(search.grows) - 1)]
        tries = [(n, box) for n, (i, kp) in enumerate(kept) if (box := box_from_keypoints(kp, grow)) is not None]
        if not tries:
            break
        found = predict_batch(model, cfg, [images[kept[n][0]] for n, _ in tries], [box for _, box in tries],
                              flip_perm if search.flip else None, search.scales)
        for (n, _), kp in zip(tries, found):
            kept[n] = (kept[n][0], kp)
    for i, kp in kept:
        if keypoints[i] is None or kp[:, 2].mean() > keypoints[i][:, 2].mean():
            keypoints[i] = kp
    return np.stack(keypoints)


def inference_device(name: str = "auto") -> torch.device:
    """auto: the first GPU when torch has CUDA, else the CPU; cuda without CUDA is an error."""
    return torch.device(pick_device(name, "--device"))
