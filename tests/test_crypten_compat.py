"""CrypTen 0.4.1 imports on torch 2.13 through the shim and computes correctly."""

import torch

from fedprompt.secure.crypten_compat import import_crypten


def test_crypten_secret_shared_arithmetic_matches_plaintext() -> None:
    crypten = import_crypten()
    crypten.init()
    try:
        torch.manual_seed(0)
        a, b = torch.randn(4, 3), torch.randn(3, 2)
        enc_a, enc_b = crypten.cryptensor(a), crypten.cryptensor(b)
        product = enc_a.matmul(enc_b).get_plain_text()
        assert torch.allclose(product, a @ b, atol=1e-3)
        # comparisons and one-hot argmin work on shares (used by secure k-means later)
        values = torch.tensor([[3.0, -1.0, 2.0], [0.5, 4.0, -2.0]])
        one_hot = crypten.cryptensor(values).argmin(dim=1, one_hot=True).get_plain_text()
        assert torch.equal(one_hot.round(), torch.nn.functional.one_hot(
            values.argmin(dim=1), 3).float())
    finally:
        crypten.uninit()


def test_onnx_converter_path_fails_loudly() -> None:
    import sys

    import_crypten()
    stub = sys.modules["torch.onnx._internal.registration"]
    from fedprompt.errors import DependencyError

    try:
        stub.registry.onnx_symbolic  # noqa: B018
    except DependencyError as exc:
        assert "ONNX" in str(exc)
    else:
        raise AssertionError("the stand-in registry must refuse use")
