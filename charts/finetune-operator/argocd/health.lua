-- Argo CD health check for finetune.dev/FineTuneJob.
-- Install as the resource customization `resource.customizations.health.finetune.dev_FineTuneJob`
-- (see ../README.md). Written for Argo CD's Lua 5.1 (gopher-lua): no goto, no integer division.
--
-- status.phase         -> health
--   Succeeded          -> Healthy
--   Failed             -> Degraded (the Failed condition's message says why)
--   Suspended          -> Suspended
--   Pending, Queued,
--   Running            -> Progressing (with status.progress.summary while running)
-- A status not yet written, or written for an older spec generation, is Progressing: the operator has
-- not caught up, and what the status says may no longer be true.

local hs = {}

local function condition(status, wanted)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

local function said(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the FineTuneJob"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation) ..
    " (status is for generation " .. tostring(status.observedGeneration) .. ")"
  return hs
end

local phase = status.phase

-- A spec the operator rejected never becomes runnable: Degraded whatever the phase says.
local valid = condition(status, "Valid")
if valid ~= nil and valid.status == "False" then
  hs.status = "Degraded"
  hs.message = said(valid, "The FineTuneJob spec is invalid")
  return hs
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = said(condition(status, "Complete"), "Fine-tuning complete")
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = said(condition(status, "Failed"), "Fine-tuning failed")
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = said(condition(status, "Suspended"), "Suspended (spec.suspend is true)")
elseif phase == "Running" then
  hs.status = "Progressing"
  local summary = nil
  if status.progress ~= nil then
    summary = status.progress.summary
  end
  if summary ~= nil and summary ~= "" then
    hs.message = "Training: " .. summary
  else
    hs.message = said(condition(status, "Running"), "Training")
  end
elseif phase == "Queued" then
  hs.status = "Progressing"
  hs.message = "Queued: " .. said(condition(status, "Running"), "waiting for GPUs or admission")
elseif phase == "Pending" then
  hs.status = "Progressing"
  hs.message = "Pending: " .. said(condition(status, "Planned"), "creating the training workload")
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
