# Invoke-OpsctlCleanup: run opsctl inside the application's container from a Windows deploy
# script, and turn its exit code into a decision.
#
#   . .\examples\Invoke-OpsctlCleanup.ps1
#   Invoke-OpsctlCleanup -Container app-worker-1 -Policy /app/policies/prod.yaml
#
# The container must already have REDIS_URL (and REDIS_PASSWORD, if the policy reads it):
# docker exec gives it the container's environment. To pass a value from this session instead,
# name the variable without a value (-PassEnvironment REDIS_URL): docker copies it, and the
# password never shows on a command line.
#
# Blocks the deploy (throws) on 2 (invalid policy or option) and 4 (a blast-radius limit
# tripped, nothing done); warns and goes on after 1 (some actions failed), 3 (Redis
# unreachable), 5 (another run holds the lock) and 6 (the metrics file could not be written);
# see README "Exit codes".

function Invoke-OpsctlCleanup {
    [CmdletBinding()]
    param(
        [Parameter(Mandatory)] [string] $Container,
        [string] $Policy = '/etc/opsctl/policy.yaml',
        [string[]] $PassEnvironment = @(),
        [string] $ReportPath = (Join-Path ([IO.Path]::GetTempPath()) 'opsctl-report.json')
    )

    $dockerArgs = @('exec')
    foreach ($name in $PassEnvironment) { $dockerArgs += @('-e', $name) }
    $dockerArgs += @($Container, 'opsctl', 'apply', $Policy, '--format', 'json')

    # PowerShell does not stop when a native command fails: read $LASTEXITCODE at once.
    & docker @dockerArgs | Out-File -Encoding utf8 -FilePath $ReportPath
    $code = $LASTEXITCODE

    switch ($code) {
        0 { Write-Host "opsctl: stuck jobs cleaned up (report: $ReportPath)" }
        { $_ -in 1, 3, 5, 6 } { Write-Warning "opsctl exited $code; the deploy goes on (report: $ReportPath)" }
        2 { throw "opsctl: the policy or an option is invalid (exit 2); fix it before deploying" }
        4 { throw "opsctl: a blast-radius limit tripped and nothing was done (exit 4); see $ReportPath" }
        default { throw "opsctl or docker exec failed with exit $code" }
    }
    return $code
}
