"""`dra-pipe bench`: one module per stage, each measured against its bare baseline in the same run."""
