"""The scaling study: its config (``config``), its cells and trials and what is left to run
(``plan``), the checks and shared context before the first trial (``setup``), one trial
(``trial``) and the Ray Tune sweep over the trials (``ray_sweep``).

May import every other stage; nothing in atoms imports it.
"""
