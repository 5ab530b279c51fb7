"""Caliper measurements on synthetic ellipsoids of known axes, isotropic and anisotropic.

A digitised outline can be off by up to one pixel per diameter (a pixel is in or out), so the
diameters are checked to within one in-plane pixel and volumes to a few per cent (5 mm slices
sample the nodule's height coarsely)."""

import json
import math

import numpy as np
import pytest

from napari_resmtnet.measurements import dice, measure_nodule, relative_volume_error, slice_diameters, volume_mm3


def ellipsoid(shape, spacing, semi_zyx, angle_deg=0.0, center_mm=None):
    """Mask of an ellipsoid with semi-axes (z, y, x) in mm, turned in the axial plane by angle."""
    axes = [np.arange(n) * s for n, s in zip(shape, spacing)]
    c = center_mm if center_mm is not None else [(n - 1) * s / 2 for n, s in zip(shape, spacing)]
    z, y, x = np.meshgrid(*(a - ci for a, ci in zip(axes, c)), indexing="ij")
    t = math.radians(angle_deg)
    xr = math.cos(t) * x + math.sin(t) * y
    yr = -math.sin(t) * x + math.cos(t) * y
    return (z / semi_zyx[0]) ** 2 + (yr / semi_zyx[1]) ** 2 + (xr / semi_zyx[2]) ** 2 <= 1.0


def _direction_deg(ends, spacing):
    (z0, y0, x0), (z1, y1, x1) = ends
    dy, dx = (y1 - y0) * spacing[1], (x1 - x0) * spacing[2]
    return math.degrees(math.atan2(dy, dx)) % 180


def test_isotropic_ellipsoid():
    sp, semi = (1.0, 1.0, 1.0), (5.3, 4.2, 7.6)
    r = measure_nodule(ellipsoid((21, 31, 41), sp, semi), sp)
    assert r.long_axis_mm == pytest.approx(2 * 7.6, abs=1.0)
    assert r.short_axis_mm == pytest.approx(2 * 4.2, abs=1.0)
    assert r.mean_diameter_mm == pytest.approx((r.long_axis_mm + r.short_axis_mm) / 2)
    assert r.volume_mm3 == pytest.approx(4 / 3 * math.pi * np.prod(semi), rel=0.03)
    assert r.slice_index == 10 and r.plane == "axial"
    d = _direction_deg(r.long_axis_ends, sp)
    assert min(d, 180 - d) < 12  # along x, up to the tilt a digitised flat tip allows


@pytest.mark.parametrize("angle", [0.0, 30.0, 75.0, 135.0])
def test_anisotropic_ct_spacing(angle):
    """Thin in-plane pixels and 5 mm slices, the ellipse turned in the axial plane."""
    sp, semi = (5.0, 0.7, 0.7), (12.5, 5.1, 8.2)
    m = ellipsoid((9, 41, 41), sp, semi, angle)
    r = measure_nodule(m, sp)
    assert r.long_axis_mm == pytest.approx(16.4, abs=0.7)
    assert r.short_axis_mm == pytest.approx(10.2, abs=0.7)
    assert r.slice_index == 4
    d = _direction_deg(r.long_axis_ends, sp)
    # the farthest pair of outline points may run across a digitised tip's flat end, so the
    # axis can tilt by several degrees while its length is within a pixel
    assert min(abs(d - angle), 180 - abs(d - angle)) < 12
    # the short axis is perpendicular to the long axis, in mm
    (a0, a1), (b0, b1) = r.long_axis_ends, r.short_axis_ends
    u = (np.subtract(a1, a0) * sp)[1:]
    v = (np.subtract(b1, b0) * sp)[1:]
    assert abs(np.dot(u, v)) < 1e-6 * np.linalg.norm(u) * np.linalg.norm(v) + 1e-9
    assert np.linalg.norm(u) == pytest.approx(r.long_axis_mm)
    assert np.linalg.norm(v) == pytest.approx(r.short_axis_mm)
    assert r.volume_mm3 == pytest.approx(4 / 3 * math.pi * np.prod(semi), rel=0.05)


def test_non_square_pixels():
    """Different y and x spacing: the measurement is in mm, not pixels."""
    sp, semi = (1.0, 0.5, 0.9), (3.1, 6.1, 3.3)
    m = ellipsoid((9, 41, 21), sp, semi, 40.0)
    r = measure_nodule(m, sp)
    assert r.long_axis_mm == pytest.approx(12.2, abs=0.9)
    assert r.short_axis_mm == pytest.approx(6.6, abs=0.9)
    assert r.volume_mm3 == pytest.approx(4 / 3 * math.pi * np.prod(semi), rel=0.05)


def test_the_slice_with_the_longest_long_axis_is_measured():
    m = np.zeros((10, 40, 40), bool)
    m[2, 10:14, 5:15] = True  # long 10
    m[6, 5:9, 5:25] = True  # long 20: the one to measure, although not the middle slice
    m[7, 20:22, 5:20] = True
    r = measure_nodule(m, (2.0, 1.0, 1.0))
    assert r.slice_index == 6
    assert r.long_axis_mm == pytest.approx(math.hypot(20, 3), abs=0.1)  # corner-cut outline, diagonal
    assert r.volume_mm3 == pytest.approx(m.sum() * 2.0)


def test_ties_go_to_the_longer_short_axis():
    m = np.zeros((4, 30, 30), bool)
    m[1, 10:12, 5:25] = True
    m[2, 8:14, 5:25] = True
    r = measure_nodule(m)
    assert r.slice_index == 2


def test_any_plane_finds_the_longest_axis():
    sp, semi = (1.0, 1.0, 1.0), (14.6, 4.2, 5.3)  # elongated along z
    m = ellipsoid((33, 13, 15), sp, semi)
    axial = measure_nodule(m, sp)
    anyp = measure_nodule(m, sp, plane="any")
    assert axial.long_axis_mm == pytest.approx(10.6, abs=1.0)
    assert anyp.plane in ("coronal", "sagittal") and anyp.long_axis_mm == pytest.approx(29.2, abs=1.0)
    assert measure_nodule(m, sp, plane="sagittal").short_axis_mm == pytest.approx(8.4, abs=1.0)


def test_small_shapes():
    assert slice_diameters(np.ones((1, 1)))[:2] == pytest.approx((1.0, 1.0))
    assert slice_diameters(np.ones((1, 5)), (1.0, 0.5))[:2] == pytest.approx((2.5, 1.0))
    one = np.zeros((3, 3, 3), np.uint8)
    one[1, 1, 1] = 7  # any non-zero label is foreground
    r = measure_nodule(one, (5.0, 0.7, 0.7))
    assert (r.long_axis_mm, r.short_axis_mm) == pytest.approx((0.7, 0.7))
    assert r.volume_mm3 == pytest.approx(5 * 0.7 * 0.7)


def test_touching_the_array_border():
    m = np.zeros((3, 10, 10), bool)
    m[:, :, :4] = True
    r = measure_nodule(m)
    # the outline is closed at the border (the long axis runs corner to corner, not cut short)
    assert r.long_axis_mm == pytest.approx(math.hypot(10, 3))
    assert 3.5 <= r.short_axis_mm < 5.0  # a chord perpendicular to a diagonal is longer than the side


def test_as_dict_is_json():
    r = measure_nodule(ellipsoid((9, 21, 21), (1, 1, 1), (3.2, 4.1, 6.3)))
    d = json.loads(json.dumps(r.as_dict()))
    assert d["plane"] == "axial" and len(d["long_axis_ends"]) == 2 and len(d["long_axis_ends"][0]) == 3


def test_volume():
    m = np.zeros((4, 5, 6), bool)
    m[1:3, 1:4, 2:6] = True
    assert volume_mm3(m, (5.0, 0.7, 0.7)) == pytest.approx(24 * 5 * 0.49)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: measure_nodule(np.zeros((3, 3, 3))), "empty"),
        (lambda: measure_nodule(np.ones((3, 3))), "3D"),
        (lambda: measure_nodule(np.ones((3, 3, 3)), (1.0, 1.0)), "spacing"),
        (lambda: measure_nodule(np.ones((3, 3, 3)), (1.0, -1.0, 1.0)), "spacing"),
        (lambda: measure_nodule(np.ones((3, 3, 3)), (1.0, float("nan"), 1.0)), "spacing"),
        (lambda: measure_nodule(np.ones((3, 3, 3)), "big"), "spacing"),
        (lambda: measure_nodule(np.ones((3, 3, 3)), plane="oblique"), "plane"),
        (lambda: measure_nodule(np.array([["a"]] * 3)), "3D|binary"),
        (lambda: slice_diameters(np.zeros((4, 4))), "empty"),
        (lambda: dice(np.ones((2, 2)), np.ones((2, 3))), "shape"),
        (lambda: relative_volume_error(np.ones((2, 2)), np.zeros((2, 2))), "empty"),
        (lambda: relative_volume_error(1.0, 0.0), "empty"),
        (lambda: relative_volume_error(-1.0, 2.0), "non-negative"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match) as exc:
        call()
    assert "\n" not in str(exc.value)


def test_dice():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    assert dice(a, b) == 1.0
    a[0] = True
    assert dice(a, b) == 0.0
    assert dice(a, a) == 1.0
    b[0, :2] = True  # 8 of a's 16 voxels
    assert dice(a, b) == pytest.approx(2 * 8 / (16 + 8))
    assert dice(a.astype(np.uint8), b.astype(np.float32)) == pytest.approx(2 * 8 / 24)


def test_relative_volume_error():
    t = np.zeros((10, 10, 10), bool)
    t[2:6, 2:6, 2:6] = True  # 64 voxels
    p = np.zeros_like(t)
    p[2:6, 2:6, 2:7] = True  # 80 voxels
    assert relative_volume_error(p, t) == pytest.approx(0.25)
    assert relative_volume_error(t, p) == pytest.approx(-0.2)
    assert relative_volume_error(p, t, (5.0, 0.7, 0.7)) == pytest.approx(0.25)
    assert relative_volume_error(90.0, 120.0) == pytest.approx(-0.25)


def test_smaller_than_a_nodule():
    from napari_resmtnet.measurements import MIN_NODULE_MM, smaller_than_nodule

    sphere3 = np.pi / 6 * MIN_NODULE_MM**3  # 14.14 mm³
    assert smaller_than_nodule(sphere3 - 0.1) and not smaller_than_nodule(sphere3 + 0.1)
    assert smaller_than_nodule(0.0)
    assert not smaller_than_nodule(None) and not smaller_than_nodule(float("nan"))
    assert smaller_than_nodule(100.0, min_diameter_mm=6.0) and not smaller_than_nodule(120.0, min_diameter_mm=6.0)
