"""rwkv_mlx's RWKV-7 model as an mlx-lm ``model_file`` module.

``python -m rwkv_mlx.convert --mlx-lm-model-file`` copies this file into the
model directory as ``rwkv_mlx_model.py`` and names it in the ``model_file``
entry of config.json. Given ``trust_remote_code=True`` (``--trust-remote-code``
on the command line), mlx-lm's loader (``mlx_lm.utils.load_model``, mlx-lm
0.32.2) then executes the copy as a standalone module named ``custom_model``
and builds the model from its ``Model`` and ``ModelArgs`` in place of
``mlx_lm.models.rwkv7``. The copy lives outside the package, so it imports
the installed rwkv_mlx by absolute name and contains no code of its own.
"""

try:
    # Importing rwkv_mlx first runs its BLAS setup (rwkv_mlx/_blas.py), as
    # everywhere. Inside mlx-lm, mlx.core is already imported, so the setup
    # leaves MLX's own BLAS in place.
    import rwkv_mlx  # noqa: F401
    from rwkv_mlx.models.rwkv7 import Model, ModelArgs
except ImportError as error:
    raise ImportError(
        "this model directory uses rwkv_mlx's RWKV-7 implementation (config.json names "
        f"rwkv_mlx_model.py in 'model_file'), but importing rwkv_mlx failed: {error}. Install rwkv_mlx "
        "(pip install rwkv_mlx), or delete the 'model_file' entry from config.json to run mlx-lm's "
        "own rwkv7 implementation instead"
    ) from error

__all__ = ["Model", "ModelArgs"]
