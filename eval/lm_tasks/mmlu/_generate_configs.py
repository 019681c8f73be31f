"""Write the 57 per-subject MMLU task YAMLs and the s3t_mmlu groups (as lm-eval's tasks/mmlu/_generate_configs.py
does for tasks/mmlu/default). Run from anywhere: ``python eval/lm_tasks/mmlu/_generate_configs.py``.

Names: task ``s3t_mmlu_<subject>``, tag ``s3t_mmlu_<category>_tasks``, groups ``s3t_mmlu_<category>`` and
``s3t_mmlu`` (acc aggregated weight_by_size, i.e. the micro average, as lm-eval's ``mmlu``)."""

from pathlib import Path

import yaml

# lm-eval's SUBJECTS table (tasks/mmlu/_generate_configs.py): subject -> category
SUBJECTS = {
    "abstract_algebra": "stem", "anatomy": "stem", "astronomy": "stem", "business_ethics": "other",
    "clinical_knowledge": "other", "college_biology": "stem", "college_chemistry": "stem",
    "college_computer_science": "stem", "college_mathematics": "stem", "college_medicine": "other",
    "college_physics": "stem", "computer_security": "stem", "conceptual_physics": "stem", "econometrics": "social_sciences",
    "electrical_engineering": "stem", "elementary_mathematics": "stem", "formal_logic": "humanities",
    "global_facts": "other", "high_school_biology": "stem", "high_school_chemistry": "stem",
    "high_school_computer_science": "stem", "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences", "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences", "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences", "high_school_physics": "stem",
    "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities", "human_aging": "other",
    "human_sexuality": "social_sciences", "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other", "marketing": "other",
    "medical_genetics": "other", "miscellaneous": "other", "moral_disputes": "humanities",
    "moral_scenarios": "humanities", "nutrition": "other", "philosophy": "humanities", "prehistory": "humanities",
    "professional_accounting": "other", "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences", "us_foreign_policy": "social_sciences",
    "virology": "other", "world_religions": "humanities",
}
ALIASES = {"stem": "stem", "other": "other", "social_sciences": "social sciences", "humanities": "humanities"}


def main() -> None:
    here = Path(__file__).resolve().parent
    for subject, cat in SUBJECTS.items():
        cfg = {
            "include": "../_s3t_mmlu_template_yaml",
            "task": f"s3t_mmlu_{subject}",
            "task_alias": subject,
            "tag": f"s3t_mmlu_{cat}_tasks",
            "description": f"The following are multiple choice questions (with answers) about "
                           f"{' '.join(subject.split('_'))}.\n\n",
            "dataset_kwargs": {"data_files": {"test": f"eval/mmlu/test/{subject}_test.csv",
                                              "dev": f"eval/mmlu/dev/{subject}_dev.csv"}},
        }
        (here / f"s3t_mmlu_{subject}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, width=1000))
    agg = [{"metric": "acc", "weight_by_size": True}]
    for cat, alias in ALIASES.items():
        (here / f"_s3t_mmlu_{cat}.yaml").write_text(yaml.safe_dump(
            {"group": f"s3t_mmlu_{cat}", "group_alias": alias, "task": [f"s3t_mmlu_{cat}_tasks"],
             "aggregate_metric_list": agg, "metadata": {"version": 2}}, sort_keys=False))
    (here / "_s3t_mmlu.yaml").write_text(
        "# MMLU test, 57 subjects: lm-eval's tasks/mmlu/default/_mmlu.yaml over the local reformatted CSVs.\n"
        + yaml.safe_dump({"group": "s3t_mmlu", "task": [f"s3t_mmlu_{c}" for c in ALIASES],
                          "aggregate_metric_list": agg, "metadata": {"version": 2}}, sort_keys=False))


if __name__ == "__main__":
    main()
