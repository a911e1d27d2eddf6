-- Argo CD health of a kubetune.io/v1alpha1 AdapterDeployment, read from its status.
-- Install as resource.customizations.health.kubetune.io_AdapterDeployment in argocd-cm
-- (see ../argocd-cm-patch.yaml). Lua 5.1 as Argo CD runs it (gopher-lua).
--
--   no status yet, or a spec generation not yet observed   Progressing
--   Progressing (a rollout is under way)                   Progressing
--   Available                                              Healthy
--   Degraded (failed or rolled back)                       Degraded
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
  hs.message = "Waiting for the kubetune operator to pick up the deployment"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to observe generation " .. tostring(generation)
  return hs
end

local replicas = "revision " .. tostring(status.revision or 0) .. ": " ..
  tostring(status.updatedReplicas or 0) .. " of " .. tostring(status.replicas or 0) .. " replicas updated, " ..
  tostring(status.readyReplicas or 0) .. " ready"

if status.phase == "Available" then
  hs.status = "Healthy"
  hs.message = replicas
elseif status.phase == "Degraded" then
  hs.status = "Degraded"
  hs.message = describe(condition(status, "Degraded"), "Degraded")
else
  hs.status = "Progressing"
  local progressing = condition(status, "Progressing")
  if progressing ~= nil and progressing.message ~= nil and progressing.message ~= "" then
    hs.message = replicas .. "; " .. progressing.message
  else
    hs.message = replicas
  end
end
return hs
