"""The demo's data and its final number.

scenes.py     deterministic rendered scenes (shapes, colours, positions, counts, a short word) + facts
tasks.py      the texts per EViP stage written from those facts (alt-text, dense captions, tasks, chats)
make_data.py  `evip demo-data OUT_DIR`: webdataset shards, LLaVA jsonl chats, held-out questions
accuracy.py   held-out multiple-choice accuracy of a trained model vs chance and majority baselines
"""
