"""Model side: types, preprocessing, detector, gate, lung prior, training, evaluation. Knows no DICOM transport."""
