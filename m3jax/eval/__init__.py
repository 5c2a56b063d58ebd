"""Evaluation in three modes: `memory` (explicit memories), `rag` (references in the context) and
`none` (the bare model), on perplexity, knowledge QA, FanOutQA single-hop questions, invented-fact
probes and multiple-choice sets. One noun a module:

    scoring      score_sequences (log-probabilities in a mode, one forward per batch), perplexity
    generation   greedy answers from `Generator` (make_generator, generate_answers), the leakage
                 filter applied per sequence (`m3jax.memory.retrieve.SequenceFilter`)
    qa           knowledge QA, FanOutQA and fact probes: items, answer matching, score_qa, score_facts
    mc           multiple choice by log-likelihood: load_mc_jsonl, score_mc
    suite        evaluate (every task in every mode, `EvalConfig`), heldout_split, load_retriever

The modes reuse decode's mode check and memory arrangement and the memory-source protocol's
queries (`chunk_queries`), RAG context (`rag_prompt`) and leakage filter (`m3jax.memory.retrieve`):
nothing of decoding or retrieval is written here again. Leakage filter at evaluation: every
retrieved reference is compared with the WHOLE evaluated text (the document, or the prompt),
threshold 2/3 (`EVAL_THRESHOLD`).
"""

from m3jax.decode import MODES
from m3jax.eval.generation import generate_answers, make_generator
from m3jax.eval.mc import MCItem, load_mc_jsonl, score_mc
from m3jax.eval.qa import (FANOUTQA_TEMPLATE, QA_TEMPLATE, QAItem, answer_correct, answer_parts, fanoutqa_items,
                           normalize_answer, qa_items, qa_text, render_answer, score_facts, score_qa)
from m3jax.eval.scoring import ScoreInput, SeqScore, as_sequence, perplexity, score_sequences
from m3jax.eval.suite import EvalConfig, evaluate, heldout_split, leads_in_order, load_retriever, select_leads

__all__ = ["MODES", "generate_answers", "make_generator", "MCItem", "load_mc_jsonl", "score_mc",
           "FANOUTQA_TEMPLATE", "QA_TEMPLATE", "QAItem", "answer_correct", "answer_parts", "fanoutqa_items",
           "normalize_answer", "qa_items", "qa_text", "render_answer", "score_facts", "score_qa", "ScoreInput",
           "SeqScore", "as_sequence", "perplexity", "score_sequences", "EvalConfig", "evaluate", "heldout_split",
           "leads_in_order", "load_retriever", "select_leads"]
