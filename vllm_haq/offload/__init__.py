"""Expert offloading engine (host store, device cache, planner); see DESIGN.md.

Empty until the offloading issue: with an expert budget of "all", every expert is resident.
"""
