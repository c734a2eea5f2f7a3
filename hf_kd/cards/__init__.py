"""Cards: what hf_kd writes about what it made, as markdown with Hub metadata.

- ``hf_kd.cards.model``: a distilled student's model card (``DistillationCardInfo``, ``render_model_card``);
- ``hf_kd.cards.run``: that card's facts from one run (arguments, evaluation logs, knowledge measures);
- ``hf_kd.cards.dataset``: a teacher cache's dataset card;
- ``hf_kd.cards.markdown``: the values, tables and code blocks every card is built from.

Cards only render: pushing them to the Hub is ``hf_kd.hub``'s.
"""
