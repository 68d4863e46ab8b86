"""DICOM networking and result delivery: receiver (SCP), senders (C-STORE, STOW-RS, folder). No torch here."""
