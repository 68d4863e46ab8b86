"""CXR triage node: DICOM C-STORE in, detector, TID 1500 SR + overlay back to the PACS."""

__version__ = "0.1.0"
