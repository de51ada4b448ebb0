"""Test helpers shipped with ckpt_track, so third-party backends can run the same contract."""
