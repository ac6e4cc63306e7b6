"""DenseCRF post-processing through pydensecrf (docs/algorithm.md §5.3, §8.1 step 6, §0.1 item 12).

`dense_crf` is the shared core: unary = -log(clip(p, 1e-5, 1)) (`unary_from_softmax`), one Gaussian
and one bilateral Potts term, mean-field inference. WeCLIP feeds it softmax(logits) and the RGB
uint8 image with `WECLIP_CRF`; CLIP-ES feeds the un-normalised [bg, CAMs] stack with `CLIPES_CRF`
and, in its released script, the image made by `clipes_crf_image` (an explicit opt-in quirk).
"""
from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from weclip.pipeline.config import CAFFE_BGR_MEAN, IGNORE_INDEX, CrfParams


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CrfParams) -> np.ndarray:
    """Posterior Q (K x H x W float32) of a fully connected CRF.

    image: H x W x 3 uint8 (the colours the bilateral term compares); probs: K x H x W scores in
    [0, 1] (softmax, or CLIP-ES's un-normalised stack; values are clipped to [1e-5, 1] for the unary).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"dense_crf needs an H x W x 3 uint8 image, got shape {image.shape} dtype {image.dtype}; "
                         "convert with np.asarray(img, dtype=np.uint8) or clipes_crf_image(...)")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2] or probs.shape[0] < 1:
        raise ValueError(f"dense_crf needs K x H x W probabilities matching the image's H x W {image.shape[:2]}, "
                         f"got {probs.shape}; resize the scores to the image size first")
    k, h, w = probs.shape
    unary = np.ascontiguousarray(unary_from_softmax(np.asarray(probs, dtype=np.float32)))
    crf = dcrf.DenseCRF2D(w, h, k)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image), compat=params.bilateral_compat)
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(k, h, w)


def clipes_crf_image(bgr_float: np.ndarray, mean_bgr: tuple[float, float, float] = CAFFE_BGR_MEAN) -> np.ndarray:
    """The image CLIP-ES's `eval_cam_with_crf.py` gives the bilateral term (§0.1 item 12, §5.3).

    bgr_float: H x W x 3 in 0..255, BGR order (cv2.imread; pass rgb[..., ::-1] for an RGB image).
    Subtracts the Caffe BGR mean and casts to uint8 the way numpy does on x86: truncate toward zero,
    then wrap modulo 256 (negative values wrap around). Written out explicitly because numpy leaves
    the cast of negative floats to uint8 platform-defined. Off by default: callers opt in.
    """
    if bgr_float.ndim != 3 or bgr_float.shape[2] != 3:
        raise ValueError(f"clipes_crf_image needs an H x W x 3 BGR image, got shape {bgr_float.shape}")
    shifted = np.asarray(bgr_float, dtype=np.float32) - np.asarray(mean_bgr, dtype=np.float32)
    return np.ascontiguousarray((np.trunc(shifted).astype(np.int64) % 256).astype(np.uint8))


def crf_labels(posterior: np.ndarray, keys: np.ndarray, confidence: float | None = None) -> np.ndarray:
    """Label map H x W int64 = keys[argmax_k Q] (§5.3); channels with a negative key never win.

    With `confidence` (CLIP-ES CGL in code: 0.95, `EvalConfig.clipes_confidence`), pixels whose
    posterior max is below it become IGNORE_INDEX.
    """
    keys = np.asarray(keys, dtype=np.int64)
    if posterior.ndim != 3 or keys.shape != (posterior.shape[0],):
        raise ValueError(f"crf_labels needs a K x H x W posterior and K keys, got {posterior.shape} and {keys.shape}")
    masked = np.where((keys < 0)[:, None, None], -np.inf, posterior)
    labels = keys[masked.argmax(axis=0)]
    if confidence is not None:
        labels[masked.max(axis=0) < confidence] = IGNORE_INDEX
    return labels
