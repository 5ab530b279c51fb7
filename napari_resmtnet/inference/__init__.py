"""Running the trained model: the `Predictor` (lung mask, sliding windows, device),
nodule characterisation (`characterise`) and the weights files it loads (`weights`).

May import the core, `io` and `model`; torch and `model` only inside functions (marked
``# lazy:``), so that importing this package stays light.
"""
