"""One exception hierarchy: every error the plugin raises on purpose is a ResMTNetError with a
one-line message, and cancellation is one type wherever a long task is cancelled."""

import pytest

from napari_resmtnet import errors


def test_every_plugin_error_derives_from_the_base():
    from napari_resmtnet.annotations.dicom_export import DicomExportError
    from napari_resmtnet.files import NoduleFileError
    from napari_resmtnet.inference.predictor import DeviceError, PredictionError
    from napari_resmtnet.io.formats import ScanReadError
    from napari_resmtnet.io.pacs import PacsError
    from napari_resmtnet.paths import OutputPathError
    from napari_resmtnet.inference.weights import WeightsError

    for cls in (DicomExportError, NoduleFileError, PredictionError, DeviceError, OutputPathError):
        assert issubclass(cls, errors.InputError) and issubclass(cls, ValueError)
    for cls in (ScanReadError, PacsError, WeightsError):
        assert issubclass(cls, errors.ResMTNetError)


def test_cancellation_is_one_type():
    from napari_resmtnet.inference import predictor as inference
    from napari_resmtnet.io import pacs
    from napari_resmtnet._qt.runner import _is_cancelled_error

    assert inference.Cancelled is pacs.Cancelled is errors.Cancelled
    assert _is_cancelled_error(inference.Cancelled())

    class Cancelled(Exception):  # another library's class of the same name is not ours
        pass

    assert not _is_cancelled_error(Cancelled())


@pytest.mark.parametrize(
    "exc, line",
    [
        (ValueError("first line\nsecond line"), "first line"),
        (RuntimeError("  \n  "), "RuntimeError"),
        (errors.InputError("  padded  "), "padded"),
    ],
)
def test_one_line(exc, line):
    assert errors.one_line(exc) == line
