"""English function words that augmentation never replaces (method 5.3, step 1).

Replacing these would mostly break grammar without producing useful new training inputs. The list
is this project's own, grouped by word class; it also holds the fragments that basic tokenisation
leaves from contractions (``don ' t`` -> ``don``, ``t``).
"""

from __future__ import annotations

_PRONOUNS = """
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself
she her hers herself it its itself they them their theirs themselves one
"""
_DETERMINERS_AND_QUANTIFIERS = """
a an the this that these those some any each every both either neither all few more most other
such no nor own same several much many
"""
_QUESTION_AND_RELATIVE = "what which who whom whose when where why how whether"
_AUXILIARIES = """
am is are was were be been being have has had having do does did doing will would shall should can
could may might must ought
"""
_PREPOSITIONS = """
about above across after against along among around at before behind below beneath beside between
beyond by down during except for from in inside into near of off on onto out outside over past
since through throughout till to toward towards under until up upon via with within without
"""
_CONJUNCTIONS_AND_ADVERBS = """
and but or so yet if then than because as while although though once also just only very too
again further here there now not
"""
_CONTRACTION_FRAGMENTS = """
s t d ll m o re ve y don doesn didn isn aren wasn weren hasn haven hadn won wouldn shan shouldn
couldn mightn mustn needn ain ma
"""

STOP_WORDS: frozenset[str] = frozenset(
    " ".join([
        _PRONOUNS, _DETERMINERS_AND_QUANTIFIERS, _QUESTION_AND_RELATIVE, _AUXILIARIES,
        _PREPOSITIONS, _CONJUNCTIONS_AND_ADVERBS, _CONTRACTION_FRAGMENTS,
    ]).split()
)
