-- Auto-routing, as a PACS router does it: every CR or DX image stored here is sent to the triage node
-- (DICOM modality "triage", defined by orthanc-entrypoint from TRIAGE_NODE_HOST/PORT/AET).
-- The node's results are SR, SC with Modality OT and PR, never CR/DX, so they are not routed back.
function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags['Modality']
  if modality == 'CR' or modality == 'DX' then
    SendToModality(instanceId, 'triage')
  end
end
