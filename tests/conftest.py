"""Suite-wide settings: one torch thread (tiny tensors; CI has 2 shared cores) and seeded RNGs.

TRADY_TEST_THREADS=N runs the tests with N torch threads instead: scripts/test.sh runs the tests marked
`numerics` again with 2 threads and another CPU kernel set (ATEN_CPU_CAPABILITY), so that a tolerance
that holds only for one machine's kernels and one thread count fails at home (docs/reliability.md)."""

import os

import pytest
import torch

TEST_THREADS = int(os.environ.get("TRADY_TEST_THREADS", "1"))


@pytest.fixture(autouse=True)
def _one_thread_seeded():
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tests that drive the loop below finetune() (which sets --threads itself) use one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)


# The tests that compare two float computations (another kernel, order, batch split or precision): marked
# `numerics`, so that scripts/test.sh reruns them under a second CPU kernel set and thread count. One
# table, here, rather than a decorator in every file: file -> test names (a name with [...] is one case).
NUMERICS = {
    "test_microbatch.py": [
        "test_full_finetuning_accumulated_gradients_equal_the_full_batch",
        "test_engine_accumulated_slice_gradients_equal_the_full_batch",
        "test_a_finetune_in_micro_batches_trains_the_same_weights_and_reports_its_peak",
    ],
    "test_modern.py": [
        "test_recompute_keeps_block_inputs_only_with_the_same_gradients",
        "test_functional_dropout_keeps_a_bit_mask_and_draws_as_stock",
        "test_functional_call_that_keeps_a_tensor_is_named_or_runs_stock",
        "test_gate_mul_error_and_exactness",
        "test_layer_norm_error_and_exactness",
        "test_attention_error_exactness_and_dropout_replay",
        "test_multihead_attention_projections_are_layers_and_eval_sees_trained_weights",
    ],
    "test_ops.py": [
        "test_conv_matches_stock_autograd", "test_conv_frozen_keeps_only_weight_and_no_slice_gradient",
        "test_gather_scatter_and_channel_norms", "test_linear_gradcheck_and_stock",
        "test_frozen_affine_gradcheck_and_saved", "test_max_pool_argmax", "test_avg_pool_keeps_nothing",
    ],
    "test_engine_optimizer.py": [
        "test_multi_step_training_matches_dense_compiled_or_not[None]",
        "test_loaded_optimizer_state_for_other_channels_is_dropped",
    ],
    "test_engine_exactness.py": [
        "test_engine_matches_dense_autograd", "test_same_padding_with_even_kernel",
        "test_two_forwards_before_one_backward", "test_zoo_model_matches_dense[mbv2-w0.35]",
    ],
    "test_activations.py": [
        "test_derivative_formula_matches_autograd", "test_backward_is_grad_times_table_level",
        "test_inplace_module_modifies_its_input",
    ],
    "test_ranking.py": ["test_channel_norms_match_hand_slicing", "test_rank_accumulator_matches_hand_computation"],
    "test_data.py": [
        "test_eval_transform_normalisation_by_hand", "test_eval_transform_grey_to_rgb_and_resize",
        "test_flip_only_is_exact_flip_per_sample",
    ],
    "test_models.py": [
        "test_efficientnet_lite_matches_reference_logits", "test_mcu_float_reconstruction_follows_the_readme",
    ],
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        names = NUMERICS.get(item.path.name, ())
        if item.name in names or item.originalname in names:
            item.add_marker(pytest.mark.numerics)
