"""Operations: small, resumable steps that the executor runs and records."""
