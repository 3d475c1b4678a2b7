"""
Course exercises, graded by the project's own tests (EXERCISES.md says what each one asks).

    python exercises.py list                     every exercise, its functions and its state
    python exercises.py start N[,M,...]          replace exercise N's functions by stubs (signature and docstring kept)
    python exercises.py check N                  run exactly exercise N's graded tests: one line each, then a total
    python exercises.py reset N[,M,...]          put exercise N's reference code back from git, byte for byte
    python exercises.py handout N,M,... DIR      a copy for students: those exercises started, no git history

A started function's body is one line, `raise NotImplementedError("exercise N: ...")`: its graded
tests fail at once and loudly, the rest of the suite passes (tests/test_exercises.py checks both).
Functions are found with the `ast` module, by their exact line spans. Both refuse a file with
uncommitted changes outside its exercises' functions, and `start` one whose functions hold yours.

The exercises are one table, EXERCISES: number -> title, file, functions, graded tests, numbered in
EXERCISES.md's order (rising difficulty). A test named without its [parameters] grades every case.
"""

import ast
import io
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from cli import UserError, run

ROOT = Path(__file__).resolve().parent
STUB_MESSAGE = "exercise {number}: write {function} (EXERCISES.md)"
STUB = 'raise NotImplementedError("{message}")'
README = "README.md"


@dataclass(frozen=True)
class Exercise:
    title: str
    file: str  # the file the functions are in, relative to the project root
    functions: tuple  # their qualified names in that file: "apply_rotary", "KVCache.store"
    tests: tuple  # the pytest node ids that grade them, and exactly those fail while they are stubs


def _tests(listing):
    """Node ids from lines "test_file.py: test_name test_name ..." (a file's names may go on over several lines)."""
    ids, file = [], None
    for word in listing.split():
        if word.endswith(".py:"):
            file = word[:-1]
        elif ids and ids[-1].count("[") > ids[-1].count("]"):  # a parameter id with spaces in it
            ids[-1] += " " + word
        else:
            ids.append(f"tests/{file}::{word}")
    return tuple(ids)


# the tests that run train.py's training loop: every exercise whose functions the loop calls is graded by them
TRAINING_RUNS = """
    test_byte_tokenizer.py: test_prepare_train_sample_pooled test_prepare_train_sample_pooled_by_gpt2_tokens
    test_ddp.py: test_only_the_main_process_logs_and_writes test_two_process_checkpoint_resumes_in_one_process
        test_two_processes_follow_the_single_process_loss_curve
    test_distill.py: test_a_gguf_file_loads_as_a_teacher_and_distills_a_bytes_student
        test_a_student_refuses_a_cache_from_another_teacher_or_other_data test_alpha_zero_is_exactly_train_py
        test_an_interrupted_cache_build_continues_where_it_stopped test_bad_settings_are_one_line_errors
        test_byte_mismatches_and_pooled_teachers_are_one_line_errors
        test_bytes_student_distills_from_a_bpe_teacher
        test_cache_holds_the_teachers_predictions_and_refuses_a_mismatch
        test_distillation_runs_and_logs_its_parts test_hf_teacher_distills
        test_teacher_of_another_tokenization_is_refused test_teacher_stays_frozen_through_a_step
        test_the_twin_of_a_partly_cached_student_trains_on_the_same_part
    test_reliability.py: test_a_bpe_prompt_without_tiktoken_files_says_how_to_get_them
        test_a_fresh_run_refuses_a_used_folder test_a_full_disk_keeps_the_previous_checkpoint
        test_a_full_disk_while_logging_is_one_line_and_keeps_the_checkpoint
        test_distill_refuses_a_pooled_teacher
        test_divergence_stops_naming_the_step_and_keeps_the_last_good_checkpoint
        test_each_step_is_logged_once_and_a_resume_keeps_the_schedule
        test_kills_at_random_moments_resume_to_the_same_bits test_overwrite_starts_the_log_afresh
        test_resume_accepts_the_same_data_copied_elsewhere test_resume_refuses_a_max_iters_below_the_saved_step
        test_resume_refuses_other_data test_resume_writes_only_where_the_command_line_says
        test_sample_blames_the_device_not_the_checkpoint test_sample_refuses_bad_input
        test_the_first_non_finite_loss_is_named_exactly
    test_reparam.py: test_training_drives_the_anneal_clock
    test_train.py: test_clipping_covers_every_parameter_the_optimizer_trains
        test_compiled_training_and_decoding_equal_eager test_prepare_train_sample_end_to_end
        test_training_lowers_the_loss_and_logs
"""

# the tests that run a pooled model: every exercise whose functions it calls is graded by them
POOLED_MODEL = """
    test_bench.py: test_a_pooled_model_is_benchmarked_per_byte test_decode_step_matches_full_forward[pooled]
    test_byte_tokenizer.py: test_cached_byte_states_equal_a_full_recompute
        test_flat_batched_model_equals_a_loop_reference test_generation_with_the_cache_equals_full_recompute
        test_loss_is_next_byte_cross_entropy_in_nats_per_byte test_no_byte_prediction_sees_a_later_byte
        test_prepare_train_sample_pooled test_prepare_train_sample_pooled_by_gpt2_tokens
        test_probabilities_of_every_two_byte_continuation_sum_to_one
    test_distill.py: test_byte_mismatches_and_pooled_teachers_are_one_line_errors
        test_distillation_runs_and_logs_its_parts[mode3] test_distillation_runs_and_logs_its_parts[mode4]
    test_evaluation.py: test_byte_loglikelihood_equals_the_forward_pass[case0-pooled]
        test_byte_loglikelihood_equals_the_forward_pass[case1-pooled]
        test_byte_loglikelihood_equals_the_forward_pass[case2-pooled]
        test_byte_loglikelihood_equals_the_forward_pass[case3-pooled]
        test_byte_loglikelihood_equals_the_forward_pass[case4-pooled]
        test_byte_loglikelihood_equals_the_forward_pass[case5-pooled]
        test_command_line_bits_per_byte_is_train_evaluate test_command_line_local_task
        test_lm_eval_picks_the_most_likely_choice[pooled]
    test_reliability.py: test_distill_refuses_a_pooled_teacher
    test_reparam.py: test_cli_merges_verifies_and_saves_a_loadable_checkpoint[pooled]
"""

EXERCISES = {
    1: Exercise("Bits per byte", "train.py",
        ("predicted_bytes", "evaluate"), _tests(TRAINING_RUNS + """
        test_distill.py: test_teacher_bpb_is_train_evaluate_on_the_teacher
        test_evaluation.py: test_command_line_bits_per_byte_is_train_evaluate
            test_long_continuations_are_scored_in_windows_like_train_evaluate
        test_train.py: test_evaluate_counts_the_bytes_of_each_predicted_token
            test_evaluate_uniform_byte_model_is_8_bits_per_byte test_resume_matches_an_uninterrupted_run
            test_time_budget_stops_within_one_step_and_ends_at_min_lr""")),
    2: Exercise("The learning-rate schedule", "optim.py",
        ("learning_rate", "cosine_decay"), _tests(TRAINING_RUNS + """
        test_train.py: test_a_signal_saves_at_the_next_step_boundary test_learning_rate_schedule
            test_resume_matches_an_uninterrupted_run test_time_budget_stops_within_one_step_and_ends_at_min_lr""")),
    3: Exercise("Weight tying, and what it saves", "model.py",
        ("GPT.num_params",), _tests(TRAINING_RUNS + """
        test_bench.py: test_a_pooled_model_is_benchmarked_per_byte test_bad_options_are_one_line_errors
            test_checkpoints_alone_are_benchmarked_side_by_side_with_bytes_per_second
            test_tiny_sweep_writes_markdown_and_the_documented_json
        test_byte_tokenizer.py: test_everything_around_the_core_is_under_a_tenth_of_a_tied_gpt2_embedding
        test_hardware.py: test_memory_estimate_bounds_a_real_training_step
        test_model.py: test_block_repeat_adds_depth_not_parameters
            test_gradients_and_an_adamw_step_match_hugging_face_gpt2 test_matches_hugging_face_gpt2
            test_share_ffn_shares_one_module_and_its_updates test_stlm_presets_are_the_size_of_their_names
            test_tied_embeddings_share_storage_and_count_once
        test_reparam.py: test_cli_merges_verifies_and_saves_a_loadable_checkpoint
            test_merged_linear_has_the_controls_shape test_merged_model_is_smaller_and_cheaper
        test_train.py: test_a_signal_saves_at_the_next_step_boundary test_resume_matches_an_uninterrupted_run""")),
    4: Exercise("A boundary rule and the lossless codec", "tokenizer.py",
        ("space_lengths", "split_long"), _tests("""
        test_byte_tokenizer.py: test_chunk_ends_are_the_segmenters_cuts_decided_from_the_past
            test_cli_prints_chunks_and_parameter_counts
            test_gpt2_ends_are_markers_in_bytes_gpt2_data_at_gpt2s_cuts
        test_reliability.py: test_fuzz_every_segmenter_round_trips
        test_tokenizer.py: test_edge_cases_round_trip test_gpt2_segmenter_cuts_at_gpt2_tokens
            test_round_trip_of_random_bytes_and_unicode test_segmenters_by_hand""")),
    5: Exercise("Reading a latency table", "bench.py",
        ("summarize_ms", "time_split"), _tests("""
        test_bench.py: test_a_pooled_model_is_benchmarked_per_byte test_bad_options_are_one_line_errors
            test_checkpoints_alone_are_benchmarked_side_by_side_with_bytes_per_second
            test_summarize_ms_median_and_nearest_rank_percentiles test_time_prefill_reports_median_and_spread
            test_time_split_attributes_a_known_time_to_the_ffn_and_leaves_the_model_as_it_was
            test_tiny_sweep_writes_markdown_and_the_documented_json
            test_training_step_learns_its_batch_and_time_train_step_keeps_the_model""")),
    6: Exercise("Rotary positions", "model.py",
        ("rotary_tables", "apply_rotary"), _tests("""
        test_bench.py: test_bad_options_are_one_line_errors test_decode_step_matches_full_forward
        test_export.py: test_export_reload_parity[overrides2-LlamaForCausalLM]
            test_export_reload_parity[overrides3-LlamaForCausalLM]
            test_failed_verification_writes_nothing_and_existing_folders_are_kept
            test_llama_differs_only_by_its_float32_rotary_tables test_refuses_a_setting_it_was_not_taught
            test_refuses_what_neither_architecture_expresses[overrides4---pos=rope]
            test_refuses_what_neither_architecture_expresses[overrides5---norm=layernorm]
            test_shared_weights_are_expanded_exactly[shape1]
        test_generation.py: test_cache_in_pieces_matches_full_forward[mqa-rope]
            test_cache_in_pieces_matches_full_forward[rope] test_cache_in_pieces_matches_full_forward[stlm-like]
            test_cached_generation_equals_the_half_window_reference[mqa-rope]
            test_cached_generation_equals_the_half_window_reference[rope]
            test_cached_generation_equals_the_half_window_reference[stlm-like]
            test_greedy_generation_within_context_equals_plain_loop[mqa-rope]
            test_greedy_generation_within_context_equals_plain_loop[rope]
            test_greedy_generation_within_context_equals_plain_loop[stlm-like]
            test_sampled_generation_with_cache_equals_the_reference[mqa-rope]
            test_sampled_generation_with_cache_equals_the_reference[rope]
            test_sampled_generation_with_cache_equals_the_reference[stlm-like]
            test_uncached_generation_is_nanogpts_sliding_window[mqa-rope]
            test_uncached_generation_is_nanogpts_sliding_window[rope]
            test_uncached_generation_is_nanogpts_sliding_window[stlm-like]
        test_model.py: test_batch_rows_are_independent[mqa-rope] test_batch_rows_are_independent[rope]
            test_batch_rows_are_independent[stlm-like] test_causal_future_tokens_do_not_leak[mqa-rope]
            test_causal_future_tokens_do_not_leak[rope] test_causal_future_tokens_do_not_leak[stlm-like]
            test_checkpoint_round_trip[stlm-like] test_gqa_equals_attention_with_repeated_kv_heads
            test_logits_shape_and_initial_loss[mqa-rope] test_logits_shape_and_initial_loss[rope]
            test_logits_shape_and_initial_loss[stlm-like] test_rope_scores_depend_only_on_relative_position
            test_stlm_presets_are_the_size_of_their_names
        test_reparam.py: test_whole_model_logits_match_in_float64[shape3-rep_anneal]
            test_whole_model_logits_match_in_float64[shape3-rep_linear]
            test_whole_model_logits_match_in_float64[shape3-rep_parallel]""")),
    7: Exercise("Causal attention's KV cache", "generation.py",
        ("KVCache.__init__", "KVCache.store"), _tests("""
        test_bench.py: test_a_pooled_model_is_benchmarked_per_byte
            test_checkpoints_alone_are_benchmarked_side_by_side_with_bytes_per_second
            test_decode_refuses_a_context_longer_than_block_size test_decode_step_matches_full_forward
            test_generation_counts_tokens_and_bytes test_generation_runs_the_work_it_claims[True]
            test_tiny_sweep_writes_markdown_and_the_documented_json
        test_byte_tokenizer.py: test_cached_byte_states_equal_a_full_recompute
            test_generation_with_the_cache_equals_full_recompute test_prepare_train_sample_pooled
            test_prepare_train_sample_pooled_by_gpt2_tokens
        test_evaluation.py: test_generate_until_is_greedy_and_stops
            test_lm_eval_hf_model_on_the_export_gives_the_same_numbers
        test_export.py: test_bpe_tokenizer_matches_tiktoken test_byte_tokenizer_round_trip test_command_line
            test_export_reload_parity test_llama_differs_only_by_its_float32_rotary_tables
            test_shared_weights_are_expanded_exactly
        test_generation.py: test_cache_in_pieces_matches_full_forward test_cache_slots_and_heads
            test_cached_generation_equals_the_half_window_reference test_generate_stream_streams
            test_generation_from_a_prompt_longer_than_the_context
            test_greedy_generation_within_context_equals_plain_loop
            test_sampled_generation_with_cache_equals_the_reference
        test_model.py: test_block_repeat_adds_depth_not_parameters test_full_context_works_and_longer_is_refused
        test_reparam.py: test_cli_merges_verifies_and_saves_a_loadable_checkpoint
            test_cli_refuses_to_save_a_merge_that_computes_something_else[generation-greedy tokens differ]
            test_whole_model_float32_logits_and_greedy_generation
        test_train.py: test_compiled_training_and_decoding_equal_eager test_prepare_train_sample_end_to_end""")),
    8: Exercise("Muon's orthogonalisation", "optim.py",
        ("orthogonalize",), _tests(TRAINING_RUNS + """
        test_bench.py: test_a_pooled_model_is_benchmarked_per_byte
            test_checkpoints_alone_are_benchmarked_side_by_side_with_bytes_per_second
            test_tiny_sweep_writes_markdown_and_the_documented_json
            test_training_step_learns_its_batch_and_time_train_step_keeps_the_model
        test_train.py: test_a_signal_saves_at_the_next_step_boundary
            test_muon_step_equals_torch_muon_on_separate_q_k_v test_resume_matches_an_uninterrupted_run[muon]
            test_time_budget_stops_within_one_step_and_ends_at_min_lr""")),
    9: Exercise("Merging a reparameterized FFN, the norm folded in", "reparam.py",
        ("RepLinearFFN.merged_state", "RepParallelFFN.merged_state", "fold_norm"), _tests("""
        test_bench.py: test_merged_variant_computes_what_the_training_form_computes
        test_reparam.py: test_block_merge_matches_training_form_in_float64
            test_cli_merges_verifies_and_saves_a_loadable_checkpoint
            test_cli_refuses_to_save_a_merge_that_computes_something_else
            test_merge_leaves_the_original_and_the_rng_alone test_merged_linear_has_the_controls_shape
            test_merged_model_is_smaller_and_cheaper test_merging_twice_or_nothing_is_a_clear_error
            test_training_drives_the_anneal_clock test_whole_model_float32_logits_and_greedy_generation
            test_whole_model_logits_match_in_float64[shape0-rep_anneal]
            test_whole_model_logits_match_in_float64[shape0-rep_linear]
            test_whole_model_logits_match_in_float64[shape0-rep_parallel]
            test_whole_model_logits_match_in_float64[shape1-rep_linear]
            test_whole_model_logits_match_in_float64[shape1-rep_parallel]
            test_whole_model_logits_match_in_float64[shape2-rep_anneal]
            test_whole_model_logits_match_in_float64[shape2-rep_linear]
            test_whole_model_logits_match_in_float64[shape2-rep_parallel]
            test_whole_model_logits_match_in_float64[shape3-rep_anneal]
            test_whole_model_logits_match_in_float64[shape3-rep_linear]
            test_whole_model_logits_match_in_float64[shape3-rep_parallel]""")),
    10: Exercise("Forward and reverse KL, temperature and the tail bucket", "distill.py",
        ("tail_logprob", "kl_divergence", "distillation_loss"), _tests("""
        test_distill.py: test_a_gguf_file_loads_as_a_teacher_and_distills_a_bytes_student
            test_a_student_refuses_a_cache_from_another_teacher_or_other_data
            test_an_interrupted_cache_build_continues_where_it_stopped
            test_bytes_student_distills_from_a_bpe_teacher
            test_cache_holds_the_teachers_predictions_and_refuses_a_mismatch
            test_distillation_runs_and_logs_its_parts test_empty_slots_count_as_no_outcome_on_both_sides
            test_full_vocabulary_kd_equals_torch_kl_and_top_k_is_a_lower_bound test_hf_teacher_distills
            test_kd_gradient_is_zero_when_student_equals_teacher test_kd_loss_matches_a_hand_computation
            test_teacher_stays_frozen_through_a_step""")),
    11: Exercise("Sliding-window byte layers and their cache", "byte_tokenizer.py",
        ("window_mask", "ByteBlock.forward"), _tests(POOLED_MODEL)),
    12: Exercise("Pooling: the core at chunk ends, decided from the past", "byte_tokenizer.py",
        ("chunk_ends", "PooledBytes.run_core"), _tests(POOLED_MODEL + """
        test_byte_tokenizer.py: test_chunk_ends_are_the_segmenters_cuts_decided_from_the_past
            test_gpt2_ends_are_markers_in_bytes_gpt2_data_at_gpt2s_cuts""")),
}


# ----------------------------------------------------------------------------
# a function's body in the source (found with ast), files and git

def _find(tree, qualname, file):
    """The FunctionDef node of `qualname` ("f" or "Class.method") in a parsed module."""
    body, node = tree.body, None
    for name in qualname.split("."):
        node = next((n for n in body if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name), None)
        if node is None:
            raise UserError(f"{file} has no {qualname}: the exercise table in exercises.py is out of date")
        body = node.body
    return node


def _is_docstring(statement):
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant) \
        and isinstance(statement.value.value, str)


def body_spans(source, functions, file):
    """{qualname: (first, end, indent)}: the 0-based lines [first, end) of each body after its docstring."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    spans = {}
    for qualname in functions:
        node = _find(tree, qualname, file)
        statements = node.body[1:] if _is_docstring(node.body[0]) else node.body
        if not statements or statements[0].lineno == node.lineno:
            raise UserError(f"{file}'s {qualname} has no body of its own lines to replace")
        if len(statements) < len(node.body):  # after the docstring
            first = node.body[0].end_lineno
        else:  # no docstring: the body starts after the signature, with any comment lines above its first statement
            first = statements[0].lineno - 1
            while lines[first - 1].strip().startswith("#"):
                first -= 1
        indent = lines[statements[0].lineno - 1][:statements[0].col_offset]
        spans[qualname] = (first, node.end_lineno, indent)
    return spans


def bodies(source, functions, file):
    """{qualname: the text of its body}."""
    lines = source.splitlines(keepends=True)
    return {q: "".join(lines[a:b]) for q, (a, b, _) in body_spans(source, functions, file).items()}


def replace_bodies(source, new_bodies, file):
    """source with the body of each function in new_bodies ({qualname: text}) replaced."""
    lines = source.splitlines(keepends=True)
    spans = body_spans(source, new_bodies, file)
    for qualname, (first, end, _) in sorted(spans.items(), key=lambda item: -item[1][0]):  # bottom up
        lines[first:end] = [new_bodies[qualname]]
    return "".join(lines)


def stub(number, qualname):
    return STUB.format(message=STUB_MESSAGE.format(number=number, function=qualname))


def stub_bodies(number, exercise, source):
    """{qualname: its one-line stub}, indented as the body it replaces."""
    newline = "\r\n" if "\r\n" in source else "\n"
    spans = body_spans(source, exercise.functions, exercise.file)
    return {q: indent + stub(number, q) + newline
            for q, (_, _, indent) in spans.items()}


def read(root, file):
    return (Path(root) / file).read_bytes().decode("utf-8")  # bytes: no newline translation either way


def write(root, file, text):
    (Path(root) / file).write_bytes(text.encode("utf-8"))


def git(root, *args):
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True)
    except FileNotFoundError:
        raise UserError("git is not installed: start, reset and handout need the project's git history") from None


def committed(root, file):
    """The file as git's HEAD has it."""
    result = git(root, "show", f"HEAD:{file}")
    if result.returncode:
        if not (root / ".git").exists():
            raise UserError(f"{root} has no git history (a handout has none): start and reset need it; "
                            "check and list work without")
        raise UserError(f"git has no committed {file}: commit it first")
    return result.stdout.decode("utf-8")


def started_in(source, exercises_in_file):
    """The exercises (number -> Exercise) of one file whose functions are all stubs in source."""
    return {number: exercise for number, exercise in exercises_in_file.items()
            if all(text.strip() == stub(number, q) for q, text in bodies(source, exercise.functions, exercise.file).items())}


def without(source, reference, exercises, file):
    """source with the functions of these exercises (all in file) put back as in reference."""
    functions = [function for exercise in exercises.values() for function in exercise.functions]
    return replace_bodies(source, bodies(reference, functions, file), file)


# ----------------------------------------------------------------------------
# the commands

def parse_numbers(text):
    numbers = [int(part) for part in text.split(",") if part.strip().isdigit()]
    if not numbers or len(numbers) != len(text.split(",")):
        raise UserError(f"expected exercise numbers like 3 or 1,4,7, got {text!r}: python exercises.py list shows them")
    for number in numbers:
        if number not in EXERCISES:
            raise UserError(f"there is no exercise {number}: choose from {', '.join(map(str, EXERCISES))}")
    return numbers


def check_only_exercises_changed(source, reference, file):
    """Refuse a file whose differences from git's HEAD reach outside its exercises' functions."""
    if without(source, reference, {n: e for n, e in EXERCISES.items() if e.file == file}, file) != reference:
        raise UserError(f"{file} has uncommitted changes outside its exercises' functions: commit or stash them "
                        "first, so that reset can give the file back exactly")


def start(numbers, root=ROOT, check_git=True):
    """Stub each exercise's functions. check_git=False: in a copy without history (a handout being made)."""
    for number in numbers:
        exercise = EXERCISES[number]
        source = read(root, exercise.file)
        if check_git and number in started_in(source, {number: exercise}):
            print(f"exercise {number} is already started")
            continue
        if check_git:
            reference = committed(root, exercise.file)
            check_only_exercises_changed(source, reference, exercise.file)
            if bodies(source, exercise.functions, exercise.file) != bodies(reference, exercise.functions, exercise.file):
                raise UserError(f"exercise {number}'s functions in {exercise.file} hold uncommitted changes of your "
                                f"own: commit them, or put the reference back with python exercises.py reset {number}")
        write(root, exercise.file, replace_bodies(source, stub_bodies(number, exercise, source), exercise.file))
        print(f"exercise {number} started: {', '.join(exercise.functions)} in {exercise.file} raise "
              f"NotImplementedError; grade with python exercises.py check {number}")


def reset(numbers, root=ROOT):
    """Put each exercise's functions back as committed; a student's version of them is replaced."""
    for number in numbers:
        exercise = EXERCISES[number]
        source, reference = read(root, exercise.file), committed(root, exercise.file)
        check_only_exercises_changed(source, reference, exercise.file)
        write(root, exercise.file, replace_bodies(source, bodies(reference, exercise.functions, exercise.file),
                                                  exercise.file))
        print(f"exercise {number} reset: {', '.join(exercise.functions)} in {exercise.file} are the reference code")


def state(number, root=ROOT):
    """started (stubs), reference (as committed), or written (anything else: work in progress)."""
    exercise = EXERCISES[number]
    source = read(root, exercise.file)
    if number in started_in(source, {number: exercise}):
        return "started"
    if git(root, "cat-file", "-e", f"HEAD:{exercise.file}").returncode:
        return "written"  # no history to compare with (a handout)
    reference = bodies(committed(root, exercise.file), exercise.functions, exercise.file)
    return "reference" if bodies(source, exercise.functions, exercise.file) == reference else "written"


def list_exercises(root=ROOT):
    for number, exercise in EXERCISES.items():
        print(f"{number:>2}  {exercise.title:<56} {exercise.file:<14} {state(number, root):<9}  {', '.join(exercise.functions)}")


def junit_node_id(case):
    """The pytest node id of a junit testcase: classname tests.test_model(.Class) plus the test's name."""
    parts = case.get("classname").split(".")
    module = [p for p in parts if p[:1].islower()]
    return "::".join(["/".join(module) + ".py", *parts[len(module):], case.get("name")])


def run_tests(node_ids, root=ROOT):
    """[(node id, 'pass' | 'fail' | 'skip', first line of the message)] of pytest on these node ids."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.xml"
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 f"--junitxml={report}", *node_ids], cwd=root, capture_output=True, text=True)
        if not report.exists():
            tail = (result.stdout + result.stderr).strip().splitlines()[-1:]
            raise UserError(f"pytest could not run the tests ({' '.join(tail)})")
        outcomes = []
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            problem = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            outcome = "pass" if problem is None else "skip" if problem.tag == "skipped" else "fail"
            lines = [] if problem is None else (problem.get("message") or problem.text or "").strip().splitlines()
            # a stub hit in a subprocess the test ran shows deep in its output: that line says the most
            stub = next((line.strip() for line in lines if "NotImplementedError: exercise " in line), None)
            outcomes.append((junit_node_id(case), outcome, stub or (lines[0] if lines else "")))
    found = {node_id.partition("[")[0] for node_id, _, _ in outcomes}
    missing = [n for n in node_ids if n.partition("[")[0] not in found]
    return outcomes + [(n, "fail", "not found: the exercise table names a test that does not exist") for n in missing]


def check(number, root=ROOT):
    exercise = EXERCISES[number]
    print(f"exercise {number}: {exercise.title} ({', '.join(exercise.functions)} in {exercise.file})")
    outcomes = run_tests(list(exercise.tests), root)
    blocked = {}  # failures at another started exercise's stub: they say nothing about this one yet
    for node_id, outcome, message in outcomes:
        other = message.partition('NotImplementedError: exercise ')[2].partition(":")[0]
        if outcome == "fail" and other.isdigit() and int(other) != number:
            outcome = "wait"
            blocked.setdefault(int(other), []).append(node_id)
        print(f"{outcome.upper():<4}  {node_id}" + (f"  {message}" if message and outcome != "pass" else ""))
    counts = {o: sum(1 for _, outcome, _ in outcomes if outcome == o) for o in ("pass", "fail", "skip")}
    waiting = "".join(f", {len(ids)} wait for exercise {n}" for n, ids in sorted(blocked.items()))
    print(f"exercise {number}: {counts['pass']} of {len(outcomes)} tests pass{waiting}"
          + (f", {counts['skip']} skipped" if counts["skip"] else ""))
    return counts["fail"] == 0


def handout_readme(numbers):
    rows = "\n".join(f"| {n}. {EXERCISES[n].title} | {', '.join(f'`{f}`' for f in EXERCISES[n].functions)} | "
                     f"`{EXERCISES[n].file}` | `python exercises.py check {n}` |" for n in numbers)
    return ("## Your exercises\n\nIn this copy, the functions below raise `NotImplementedError` until you write "
            "them.\nEXERCISES.md says what each exercise asks, what to read first, and the question to answer.\n"
            "Each is graded by the project's own tests, one line per test and a total:\n\n"
            f"| exercise | write | in | check it with |\n|---|---|---|---|\n{rows}\n\n`python exercises.py list` "
            "shows where each stands. The rest of the suite passes as handed out:\n`python -m pytest -q` fails "
            "only in these exercises' tests.\n\n")


def handout(numbers, folder, root=ROOT):
    """The committed project (git archive: no history, no build output) in folder, with these exercises started."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder} is not empty: name a new folder for the handout")
    archive = git(root, "archive", "--format=tar", "HEAD")
    if archive.returncode:
        raise UserError(f"git archive failed in {root}: a handout is made from a git checkout's committed files")
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    start(numbers, folder, check_git=False)
    readme = read(folder, README)
    title, _, rest = readme.partition("\n\n")  # after the title line
    write(folder, README, f"{title}\n\n{handout_readme(numbers)}{rest}")
    print(f"handout with exercises {', '.join(map(str, numbers))} written to {folder} (no git history)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    command, args = argv[0], argv[1:]
    expected = {"list": 0, "start": 1, "check": 1, "reset": 1, "handout": 2}
    if command not in expected:
        raise UserError(f"unknown command {command!r}: use list, start, check, reset or handout (see --help)")
    if len(args) != expected[command]:
        raise UserError(f"{command} takes {expected[command]} argument(s), got {len(args)}: see --help")
    numbers = parse_numbers(args[0]) if args else None
    if command == "list":
        list_exercises()
    elif command in ("start", "reset"):
        (start if command == "start" else reset)(numbers)
    elif command == "handout":
        handout(numbers, args[1])
    elif len(numbers) != 1:
        raise UserError("check takes one exercise number at a time")
    else:
        sys.exit(0 if check(numbers[0]) else 1)


if __name__ == "__main__":
    run(main)
