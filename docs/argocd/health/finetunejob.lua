-- Argo CD health of a kubetune.io/v1alpha1 FineTuneJob, read from its status.
-- Install as resource.customizations.health.kubetune.io_FineTuneJob in argocd-cm
-- (see ../argocd-cm-patch.yaml). Lua 5.1 as Argo CD runs it (gopher-lua).
--
--   no status yet, or a spec generation not yet observed   Progressing
--   Pending, Admitted, Running                             Progressing
--   Running with the Stalled condition True                Degraded
--   Succeeded                                              Healthy
--   Failed                                                 Degraded
--   Suspended                                              Suspended
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

-- "Reason: message" of a condition, or the fallback when there is none.
local function describe(c, fallback)
  if c == nil then
    return fallback
  end
  local reason = c.reason or fallback
  if c.message ~= nil and c.message ~= "" then
    return reason .. ": " .. c.message
  end
  return reason
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick up the job"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = describe(condition(status, "Succeeded"), "Succeeded")
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(condition(status, "Failed"), "Failed")
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(condition(status, "Suspended"), "Suspended")
elseif phase == "Running" then
  local stalled = condition(status, "Stalled")
  if stalled ~= nil and stalled.status == "True" then
    hs.status = "Degraded"
    hs.message = describe(stalled, "Stalled")
  else
    hs.status = "Progressing"
    local progress = status.progress
    if progress ~= nil and progress.totalSteps ~= nil and progress.totalSteps > 0 then
      hs.message = "Running: step " .. tostring(progress.step or 0) .. " of " .. tostring(progress.totalSteps)
    else
      hs.message = describe(condition(status, "Running"), "Running")
    end
  end
else
  -- Pending or Admitted: say what it waits for when a condition says so.
  hs.status = "Progressing"
  local inputs = condition(status, "InputsReady")
  if inputs ~= nil and inputs.status == "False" then
    hs.message = describe(inputs, phase)
  else
    hs.message = describe(condition(status, "Running"), phase)
  end
end
return hs
