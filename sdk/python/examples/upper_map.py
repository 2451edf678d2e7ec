"""A map that upper-cases each message, keeps its key, tags it "upper", and drops
empty messages. Run with drover_pipeline.py beside it or on PYTHONPATH."""

import drover_pipeline as dp


def upper(msg):
    if not msg.payload:
        return []
    return [dp.Output(msg.payload.upper(), key=msg.key, tags=["upper"])]


dp.map(upper)
