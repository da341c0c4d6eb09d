"""Stage 2: which width (and, measured, which low-rank choice) each part of each layer gets.

    importance.py   per-layer importance scores (a name -> function table)
    budget.py       what each module costs at a width; budgets given as bits or a setting
    solver.py       the multiple-choice knapsack (and the continuous optimum, for reference)
    plan.py         BitPlan (the JSON plan the quantizers read) and allocate()
    search.py       the measured search: every option built and scored by the output KL
    report.py       a plan as a table and a plot
"""
from casp.allocation.budget import (SettingRules, average_bits, dense_parameters, parse_budget,
                                    parse_codebook_map, uniform_average_bits, uniform_setting_bits)
from casp.allocation.importance import IMPORTANCE_SCORES, ImportancePass
from casp.allocation.plan import BitPlan, allocate
from casp.allocation.report import format_plan_table, plot_plan
from casp.allocation.solver import LayerChoice, continuous_allocation, solve_choices, solve_widths

__all__ = ["BitPlan", "IMPORTANCE_SCORES", "ImportancePass", "LayerChoice", "SettingRules",
           "allocate", "average_bits", "continuous_allocation", "dense_parameters",
           "format_plan_table", "parse_budget", "parse_codebook_map", "plot_plan",
           "solve_choices", "solve_widths", "uniform_average_bits", "uniform_setting_bits"]
