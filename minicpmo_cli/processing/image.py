"""MiniCPM-V/o image processor: LLaVA-UHD slicing, normalisation, patch-strip layout and placeholder text.

Reproduces the reference ``image_processing_minicpmv.py`` (spec vision-llm §5) number for number: the
grid choice, Python's banker's rounding in ``ensure_divide``, the truncations in ``find_best_resize`` and
PIL bicubic resizes all change the output, so they are kept exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

PREPROCESSOR_CONFIG = "preprocessor_config.json"

# --------------------------------------------------------------------------------------------------
# Geometry helpers (pure functions; sizes are (width, height) as in PIL)
# --------------------------------------------------------------------------------------------------


def ensure_divide(length: float, patch_size: int) -> int:
    """Nearest multiple of ``patch_size`` (at least one patch). Python ``round`` is half-to-even, as the
    reference: 35/14 = 2.5 rounds to 2."""
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(
    original_size: tuple[float, float], scale_resolution: int, patch_size: int, allow_upscale: bool = False
) -> tuple[int, int]:
    """Size with about scale_resolution**2 area and the same aspect ratio, snapped to the patch grid.

    Only images larger than scale_resolution**2 are rescaled unless ``allow_upscale``; height is truncated
    first and width derived from the truncated height (both ``int``), as the reference.
    """
    width, height = original_size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_sliced_grid(
    image_size: tuple[int, int], max_slice_nums: int, scale_resolution: int = 448, never_split: bool = False
) -> list[int] | None:
    """Best [cols, rows] grid for an image, or None when it is not sliced.

    Candidates are the factorisations of multiple-1, multiple, multiple+1 slices (no 1, none above
    max_slice_nums); the one closest in log aspect ratio wins, ties keeping the first (strict ``<``).
    """
    width, height = image_size
    log_ratio = math.log(width / height)
    ratio = width * height / (scale_resolution * scale_resolution)
    multiple = min(math.ceil(ratio), max_slice_nums)
    if multiple <= 1 or never_split:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    candidates = [[m, n // m] for n in counts for m in range(1, n + 1) if n % m == 0]
    best_grid, min_error = [1, 1], float("inf")
    for grid in candidates:
        error = abs(log_ratio - math.log(grid[0] / grid[1]))
        if error < min_error:
            best_grid, min_error = grid, error
    return best_grid


def get_refine_size(
    original_size: tuple[int, int],
    grid: list[int],
    scale_resolution: int,
    patch_size: int,
    allow_upscale: bool = False,
) -> tuple[int, int]:
    """Size of the whole refined image so that each of the cols x rows cells is patch-aligned.

    The width is first snapped to a multiple of ``cols`` (not 14); the cell size is then a float.
    """
    width, height = original_size
    cols, rows = grid
    cell_width = ensure_divide(width, cols) / cols
    cell_height = ensure_divide(height, rows) / rows
    best_width, best_height = find_best_resize(
        (cell_width, cell_height), scale_resolution, patch_size, allow_upscale=allow_upscale
    )
    return best_width * cols, best_height * rows


def split_to_patches(image: Image.Image, grid: list[int]) -> list[list[Image.Image]]:
    """Crop ``image`` into rows (top to bottom) of tiles (left to right) for a [cols, rows] grid."""
    width, height = image.size
    tile_width = int(width / grid[0])
    tile_height = int(height / grid[1])
    return [
        [image.crop((left, top, left + tile_width, top + tile_height)) for left in range(0, width, tile_width)]
        for top in range(0, height, tile_height)
    ]


def slice_image(
    image: Image.Image, max_slice_nums: int = 9, scale_resolution: int = 448, patch_size: int = 14,
    never_split: bool = False,
) -> tuple[Image.Image, list[list[Image.Image]], list[int] | None]:
    """Returns (source image, tiles by row, grid). Unsliced images are resized up or down to ~448**2."""
    original_size = image.size
    grid = get_sliced_grid(original_size, max_slice_nums, scale_resolution, never_split)
    if grid is None:
        best_size = find_best_resize(original_size, scale_resolution, patch_size, allow_upscale=True)
        return image.resize(best_size, resample=Image.Resampling.BICUBIC), [], None
    source_size = find_best_resize(original_size, scale_resolution, patch_size)
    source = image.copy().resize(source_size, resample=Image.Resampling.BICUBIC)
    refine_size = get_refine_size(original_size, grid, scale_resolution, patch_size, allow_upscale=True)
    refined = image.resize(refine_size, resample=Image.Resampling.BICUBIC)
    return source, split_to_patches(refined, grid), grid


def reshape_by_patch(image: np.ndarray, patch_size: int) -> np.ndarray:
    """[3, H, W] -> [3, patch, L*patch]: patches side by side in one strip, raster order."""
    channels, height, width = image.shape
    rows, cols = height // patch_size, width // patch_size
    # Same layout as the reference's unfold -> (C, p, p, L) -> permute(0, 1, 3, 2) -> (C, p, L*p); pixels
    # beyond a whole patch are dropped, as unfold does.
    patches = image[:, : rows * patch_size, : cols * patch_size]
    patches = patches.reshape(channels, rows, patch_size, cols, patch_size)
    return np.ascontiguousarray(patches.transpose(0, 2, 1, 3, 4).reshape(channels, patch_size, -1))


# --------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------


def _to_pil(image: Any) -> Image.Image:
    """PIL images pass through; HWC/CHW arrays (uint8, or float in [0, 1]) are converted as the reference."""
    if isinstance(image, Image.Image):
        return image
    array = image.numpy() if hasattr(image, "numpy") else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array.transpose(1, 2, 0)
    if np.issubdtype(array.dtype, np.floating):
        array = array * 255
    return Image.fromarray(array.astype(np.uint8))


class MiniCPMVImageProcessor:
    """Image processor of MiniCPM-o 2.6; takes the keys of ``preprocessor_config.json``."""

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        max_slice_nums: int = 9,
        scale_resolution: int = 448,
        patch_size: int = 14,
        use_image_id: bool = False,
        image_feature_size: int = 64,
        im_start: str = "<image>",
        im_end: str = "</image>",
        slice_start: str = "<slice>",
        slice_end: str = "</slice>",
        unk: str = "<unk>",
        im_id_start: str = "<image_id>",
        im_id_end: str = "</image_id>",
        slice_mode: bool = True,
        norm_mean: list[float] = (0.5, 0.5, 0.5),
        norm_std: list[float] = (0.5, 0.5, 0.5),
        version: float = 2.0,
        **_ignored: Any,  # the whisper feature-extractor keys and auto_map etc. share the file
    ) -> None:
        # Defaults are the reference class defaults; the o-2.6 file sets use_image_id true, version 2.6.
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        self.patch_size = patch_size
        self.use_image_id = use_image_id
        self.image_feature_size = image_feature_size
        self.im_start_token = im_start
        self.im_end_token = im_end
        self.slice_start_token = slice_start
        self.slice_end_token = slice_end
        self.unk_token = unk
        self.im_id_start = im_id_start
        self.im_id_end = im_id_end
        self.slice_mode = slice_mode
        self.mean = np.array(norm_mean, dtype=np.float32)
        self.std = np.array(norm_std, dtype=np.float32)
        self.version = version

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides: Any) -> MiniCPMVImageProcessor:
        """Read ``preprocessor_config.json`` from a checkpoint folder."""
        values = json.loads((Path(folder) / PREPROCESSOR_CONFIG).read_text(encoding="utf-8"))
        values.update(overrides)
        return cls(**values)

    # ---- slicing ---------------------------------------------------------------------------------

    def _max_slices(self, max_slice_nums: int | None) -> int:
        value = self.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        if value <= 0:
            raise ValueError(f"max_slice_nums must be positive, got {value}")
        return value

    def get_sliced_grid(self, image_size: tuple[int, int], max_slice_nums: int, never_split: bool = False):
        return get_sliced_grid(image_size, max_slice_nums, self.scale_resolution, never_split)

    def get_sliced_images(self, image: Image.Image, max_slice_nums: int | None = None) -> list[Image.Image]:
        """[source] + tiles in row-major order. Without slice_mode the image is used as given (as the
        reference: no resize at all)."""
        if not self.slice_mode:
            return [image]
        source, tiles, _ = slice_image(
            image, self._max_slices(max_slice_nums), self.scale_resolution, self.patch_size
        )
        return [source] + [tile for row in tiles for tile in row]

    # ---- placeholder text ------------------------------------------------------------------------

    def get_grid_placeholder(self, grid: list[int] | None) -> str:
        if grid is None:
            return ""
        tile = self.slice_start_token + self.unk_token * self.image_feature_size + self.slice_end_token
        cols, rows = grid
        return "\n".join(tile * cols for _ in range(rows))

    def get_image_id_placeholder(self, idx: int = 0) -> str:
        return f"{self.im_id_start}{idx}{self.im_id_end}"

    def get_slice_image_placeholder(
        self, image_size: tuple[int, int], image_idx: int = 0, max_slice_nums: int | None = None,
        use_image_id: bool | None = None,
    ) -> str:
        """Text that stands for one image: [<image_id>k</image_id>]<image><unk>*64</image> then the slice
        rows (no newline between the source image and the first row; rows joined by "\\n")."""
        grid = self.get_sliced_grid(tuple(int(v) for v in image_size), self._max_slices(max_slice_nums))
        text = self.im_start_token + self.unk_token * self.image_feature_size + self.im_end_token
        use_image_id = self.use_image_id if use_image_id is None else bool(use_image_id)
        if use_image_id:
            text = self.get_image_id_placeholder(image_idx) + text
        if self.slice_mode:
            text += self.get_grid_placeholder(grid)
        return text

    # ---- pixels ----------------------------------------------------------------------------------

    def _normalize(self, image: Image.Image) -> np.ndarray:
        """uint8 HWC -> float32 CHW, (x/255 - mean)/std in float32 as transformers' normalize does."""
        array = np.asarray(image, dtype=np.uint8).astype(np.float32) / 255
        array = (array - self.mean) / self.std
        return array.transpose(2, 0, 1)

    def preprocess_image(
        self, image: Any, max_slice_nums: int | None = None
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """One image -> (list of [3, 14, L*14] float32 strips, tgt_sizes [n, 2] int64 (h, w) in patches)."""
        strips, sizes = [], []
        for piece in self.get_sliced_images(_to_pil(image).convert("RGB"), max_slice_nums):
            chw = self._normalize(piece)
            strips.append(reshape_by_patch(chw, self.patch_size))
            sizes.append((chw.shape[1] // self.patch_size, chw.shape[2] // self.patch_size))
        return strips, np.array(sizes, dtype=np.int64)

    def __call__(
        self, images: Any, max_slice_nums: int | None = None, return_tensors: str | None = "pt", **_: Any
    ):
        return self.preprocess(images, max_slice_nums=max_slice_nums, return_tensors=return_tensors)

    def preprocess(
        self, images: Any, max_slice_nums: int | None = None, return_tensors: str | None = "pt", **_: Any
    ):
        """images: a list per sample of images (or a flat list / a single image for one sample).

        Returns a BatchFeature with ragged lists: pixel_values[sample][slice] [3, 14, L*14],
        image_sizes[sample][image] (w, h), tgt_sizes[sample] [n_slices, 2] ([0, 2] for no image).
        """
        from transformers import BatchFeature

        if isinstance(images, Image.Image) or _is_array_image(images):
            images = [[images]]
        elif len(images) > 0 and (isinstance(images[0], Image.Image) or _is_array_image(images[0])):
            images = [images]
        all_pixels, all_image_sizes, all_tgt_sizes = [], [], []
        for sample in images:
            pixels, image_sizes, tgt_sizes = [], [], []
            for image in sample or []:
                pil = _to_pil(image)
                image_sizes.append(pil.size)
                strips, sizes = self.preprocess_image(pil, max_slice_nums)
                pixels.extend(strips)
                tgt_sizes.append(sizes)
            stacked = np.concatenate(tgt_sizes) if tgt_sizes else np.zeros((0, 2), dtype=np.int64)
            all_pixels.append(pixels)
            all_image_sizes.append(image_sizes)
            all_tgt_sizes.append(stacked)
        if return_tensors == "pt":
            import torch

            all_pixels = [[torch.from_numpy(p) for p in sample] for sample in all_pixels]
            all_tgt_sizes = [torch.from_numpy(t) for t in all_tgt_sizes]
        elif return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        data = {"pixel_values": all_pixels, "image_sizes": all_image_sizes, "tgt_sizes": all_tgt_sizes}
        return BatchFeature(data=data)


def _is_array_image(value: Any) -> bool:
    """A single image given as an array ([H, W, C] or [C, H, W]), not a list of images."""
    return hasattr(value, "ndim") and value.ndim == 3
