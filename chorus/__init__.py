"""Generated API stubs live in `chorus.v1` (made by `make proto` from protos/chorus/v1/*.proto; never edited)."""
