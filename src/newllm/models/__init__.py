"""Models, pure nn.Modules: New-LLM (CVFP) in `cvfp`, the baselines in `transformer`, `lstm`, `cvp`.

Deliberately empty: a stage imports only the model module it trains (see models/factory.py), so
editing one model's file reruns only the stages that build it.
"""
