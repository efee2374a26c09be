"""Evidence verification: IMA measurement lists, PCR replay, TPM quotes, runtime policy, bundles."""
