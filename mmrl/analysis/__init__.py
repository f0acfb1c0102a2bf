"""Looking inside a pooling (``mmrl analyze``): dependence estimators, token maps, the analysis runner."""
from .estimators import (
    CovarianceAccumulator,
    block_cka,
    gaussian_gram,
    hsic_permutation_pvalue,
    hsic_unbiased,
    hsic_unbiased_gram,
    linear_cka,
    linear_gram,
    median_bandwidth,
    off_diagonal_mean,
    u_centre,
)
from .token_weights import token_shares, token_weights

__all__ = ["CovarianceAccumulator", "block_cka", "gaussian_gram", "hsic_permutation_pvalue", "hsic_unbiased",
           "hsic_unbiased_gram", "linear_cka", "linear_gram", "median_bandwidth", "off_diagonal_mean", "u_centre",
           "token_shares", "token_weights", "run_analysis"]


def __getattr__(name):  # the runner pulls in the model code; the estimators do not need it
    if name == "run_analysis":
        from .run import run_analysis

        return run_analysis
    raise AttributeError(name)
