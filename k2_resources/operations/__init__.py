"""Operations domain code: table maintenance (compaction, snapshot expiry, orphan clean-up)."""
