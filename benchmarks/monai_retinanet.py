"""Reference: MONAI's RetinaNet lung-nodule detector on the same CT, timed the same way.

Runs in its own environment (MONAI needs torchvision, which the project does not use)::

    python3 -m venv .venv-monai
    .venv-monai/bin/pip install torch==2.14.1 torchvision==0.29.1
    .venv-monai/bin/pip install monai SimpleITK numpy
    .venv-monai/bin/python benchmarks/monai_retinanet.py CT.nrrd --out result.json

The network and inference settings are those of the MONAI model-zoo bundle
``lung_nodule_ct_detection`` (``configs/inference.json``): a 3D ResNet-50 backbone
(``conv1_t_stride=[2,2,1]``, ``conv1_t_size=[7,7,7]``) with an FPN on returned layers
[1, 2], RetinaNet (1 class, 3 anchors, ``size_divisible=[16,16,8]``), the anchor generator
``AnchorGeneratorWithAnchorShape(feature_map_scales=[1,2,4], base_anchor_shapes=[[6,8,4],
[8,6,5],[10,10,6]])``, box selection ``score_thresh=0.02, topk_candidates_per_level=1000,
nms_thresh=0.22, detections_per_img=300``, and sliding-window inference with
``roi_size=[512,512,192], overlap=0.25, sw_batch_size=1, mode='constant'``. Preprocessing
as the bundle's: orientation RAS, resampling to 0.703125 x 0.703125 x 1.25 mm, intensity
window [-1024, 300] HU -> [0, 1]. Weights are random (their values do not change the time
of a dense network). No AMP on the CPU (the bundle enables it only with CUDA).

Prints one JSON line: read / preprocessing / network (sliding window + box selection) /
end-to-end seconds, number of boxes and the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time

from procstat import other_load, peak_rss_mb  # the script's own folder is on sys.path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("image")
    ap.add_argument("--out", help="write the JSON result here too")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--roi",
        type=int,
        nargs=3,
        default=[512, 512, 192],
        help="sliding-window size (default: the bundle's; smaller only to smoke-test this script)",
    )
    args = ap.parse_args(argv)

    load_before = other_load()
    t_start = time.perf_counter()
    import numpy as np
    import SimpleITK as sitk
    import torch
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.data import MetaTensor
    from monai.networks.nets import resnet
    from monai.transforms import Orientation, ScaleIntensityRange, Spacing

    t_import = time.perf_counter() - t_start
    torch.manual_seed(0)
    dev = torch.device(args.device)

    t0 = time.perf_counter()
    backbone = resnet.resnet50(spatial_dims=3, n_input_channels=1, conv1_t_stride=[2, 2, 1], conv1_t_size=[7, 7, 7])
    feature_extractor = resnet_fpn_feature_extractor(backbone, 3, False, [1, 2], None)
    net = RetinaNet(
        spatial_dims=3, num_classes=1, num_anchors=3, feature_extractor=feature_extractor, size_divisible=[16, 16, 8]
    ).to(dev)
    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[1, 2, 4], base_anchor_shapes=[[6, 8, 4], [8, 6, 5], [10, 10, 6]]
    )
    detector = RetinaNetDetector(network=net, anchor_generator=anchors, debug=False)
    detector.set_box_selector_parameters(
        score_thresh=0.02, topk_candidates_per_level=1000, nms_thresh=0.22, detections_per_img=300
    )
    detector.set_sliding_window_inferer(
        roi_size=list(args.roi), overlap=0.25, sw_batch_size=1, mode="constant", device="cpu"
    )
    detector.eval()
    t_model = time.perf_counter() - t0
    n_params = sum(p.numel() for p in net.parameters())

    # read (SimpleITK; the bundle's ITKReader gives the same array, x/y/z order)
    t0 = time.perf_counter()
    img = sitk.ReadImage(args.image)
    arr = sitk.GetArrayFromImage(img)  # z, y, x
    t_read = time.perf_counter() - t0

    t0 = time.perf_counter()
    sp = np.array(img.GetSpacing())
    org = np.array(img.GetOrigin())
    dirn = np.array(img.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = dirn @ np.diag(sp)
    affine[:3, 3] = org
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS (affine_lps_to_ras)
    x = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 1, 0)))[None].float(), affine=torch.as_tensor(affine)
    )
    x = Orientation(axcodes="RAS")(x)
    x = Spacing(pixdim=[0.703125, 0.703125, 1.25])(x)
    x = ScaleIntensityRange(a_min=-1024.0, a_max=300.0, b_min=0.0, b_max=1.0, clip=True)(x)
    x = x.as_tensor().to(dev)
    t_pre = time.perf_counter() - t0
    shape = list(x.shape)

    t0 = time.perf_counter()
    with torch.no_grad():
        out = detector([x], use_inferer=True)
    t_net = time.perf_counter() - t0
    n_boxes = int(out[0][detector.target_box_key].shape[0])

    h = hashlib.sha256()
    with open(args.image, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    res = {
        "method": "MONAI RetinaNet (lung_nodule_ct_detection bundle architecture, random weights)",
        "monai": __import__("monai").__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "params": n_params,
        "image": args.image,
        "image_sha256": h.hexdigest(),
        "input_shape": shape,
        "import_s": round(t_import, 3),
        "model_s": round(t_model, 3),
        "read_s": round(t_read, 3),
        "preprocessing_s": round(t_pre, 3),
        "network_s": round(t_net, 3),
        "end_to_end_s": round(t_read + t_pre + t_net, 3),
        "boxes": n_boxes,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "python": platform.python_version(),
        "roi_size": list(args.roi),
        "load_before": load_before,
        "load_after": other_load(),
        "repeats": 1,
    }
    line = json.dumps(res)
    print(line)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(json.dumps(res, indent=2) + "\n")
        import os

        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
