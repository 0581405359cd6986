"""More IE training rows, recombined from the triples of the training rows themselves (never from a test file).

The bundled IE sample has about a hundred rows; more of them might teach a small model where spans start and end.
:func:`generated_ie_examples` takes the rows a run trains on, collects their triples by relation (component +
fault state for ``部件故障`` and ``性能故障``, part + whole for ``组成``, tool + what it measures for ``检测工具``)
and writes new fault reports that state them in the way the sample does (``压缩机不吸合``, ``用万用表测量…``,
``左前制动钳导向销锈蚀卡滞``), with the answer the rule of the sample gives: one triple per line, in the order
the text mentions them (report numbers, too, are the training rows' own). Components and states are paired at
random, so the rows are new combinations of known words. Deterministic in ``seed``.

Off by default (``--generated-rows N`` turns it on): on the IE validation split of ``python -m bench tune``, 600
such rows at 150 steps lowered the tiny model's exact-triple F1 (embedding 0.091 -> 0.069, LoRA 0.044 -> 0.025).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .rows import Example

FAULTS = ("部件故障", "性能故障")
REPORT_NUMBER = re.compile(r"(\d+)号汽车故障报告")
OPENINGS = ("故障现象：", "客户反映", "车主反映", "故障描述：", "{n}号汽车故障报告故障描述：",
            "一辆{year}款{car}，行驶里程{km}km。车主反映", "一辆{car}轿车，")
CAUSES = ("检查发现", "故障原因：", "拆检发现", "进一步检查发现")
CARS = ("轿车", "SUV", "面包车", "货车", "出租车", "客车", "皮卡", "两厢车")
REPAIRS = ("维修方案：更换{part}。", "更换{part}后故障排除。", "清洗{part}后试车正常。", "")


@dataclass(frozen=True)
class _Pools:
    faults: dict[str, list[tuple[str, str]]]  # relation -> (component, state)
    parts: list[tuple[str, str]]  # (part, whole)
    tools: list[tuple[str, str]]  # (tool, what it measures)
    report_numbers: list[str]  # of the training rows' report headers ("218号汽车故障报告")


def _pools(examples: Sequence[Example]) -> _Pools:
    faults: dict[str, list[tuple[str, str]]] = {relation: [] for relation in FAULTS}
    parts, tools = [], []
    for example in examples:
        for line in example.answer.splitlines():
            pieces = line.split("_")
            if len(pieces) != 3 or not all(pieces):
                continue
            head, relation, tail = pieces
            if relation in faults:
                faults[relation].append((head, tail))
            elif relation == "组成":
                parts.append((head, tail))
            elif relation == "检测工具":
                tools.append((head, tail))
    numbers = [n for example in examples for n in REPORT_NUMBER.findall(example.text)]
    return _Pools(faults, parts, tools, numbers)


def _fault(pools: _Pools, rng: random.Random) -> tuple[str, list[str]]:
    """One clause stating a fault, and its triples in the order of the text."""
    relation = "部件故障" if rng.random() < 0.8 or not pools.faults["性能故障"] else "性能故障"
    pool = pools.faults[relation] or pools.faults["部件故障"]
    component = rng.choice(pool)[0]
    state = rng.choice(pool)[1]
    if pools.parts and rng.random() < 0.2:  # "<whole><part><state>": the part also belongs to the whole
        part, whole = rng.choice(pools.parts)
        return f"{whole}{part}{state}", [f"{part}_{relation}_{state}", f"{part}_组成_{whole}"]
    link = rng.choice(("", "", "", "出现", "有"))
    return f"{component}{link}{state}", [f"{component}_{relation}_{state}"]


def _report(pools: _Pools, rng: random.Random) -> Example:
    openings = [o for o in OPENINGS if "{n}" not in o or pools.report_numbers]
    opening = rng.choice(openings).format(n=rng.choice(pools.report_numbers or ["0"]), year=rng.randint(2008, 2022),
                                          car=rng.choice(CARS), km=rng.randint(10, 200) * 1000)
    first = [_fault(pools, rng) for _ in range(rng.randint(1, 2))]
    text = opening + "，".join(clause for clause, _ in first) + "。"
    triples = [t for _, found in first for t in found]
    if pools.tools and rng.random() < 0.25:
        tool, measured = rng.choice(pools.tools)
        text += f"用{tool}{rng.choice(('检测', '测量', '读取'))}{measured}，"
        triples.append(f"{tool}_检测工具_{measured}")
        clause, found = _fault(pools, rng)
        text += f"发现{clause}。"
        triples.extend(found)
    elif rng.random() < 0.6:
        clause, found = _fault(pools, rng)
        text += f"{rng.choice(CAUSES)}{clause}。"
        triples.extend(found)
    component = rng.choice(pools.faults["部件故障"] or [("", "")])[0]
    text += rng.choice(REPAIRS).format(part=component) if component else ""
    return Example(text=text, answer="\n".join(dict.fromkeys(triples)), where="generated")


def generated_ie_examples(examples: Sequence[Example], count: int, seed: int = 0) -> list[Example]:
    """``count`` new IE rows recombined from the triples of ``examples`` (empty if they hold no fault triple)."""
    pools = _pools(examples)
    if count <= 0 or not pools.faults["部件故障"]:
        return []
    rng = random.Random(seed)
    return [_report(pools, rng) for _ in range(count)]


def with_generated_rows(task: str, examples: Sequence[Example], count: int, seed: int = 0) -> list[Example]:
    """The training rows of a run: ``examples`` followed by ``count`` generated ones (IE only; others unchanged)."""
    examples = list(examples)
    return examples + generated_ie_examples(examples, count, seed) if task == "ie" and count else examples
